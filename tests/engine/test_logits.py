"""Logits processors against straightforward per-element references of each formula, on fixed logits,
and in the engine: greedy with `repetition_penalty` equals Hugging Face `generate`'s."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine import logits as lp
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams

VOCAB = 40


def _seq(prompt, output, **sampling) -> Sequence:
    seq = Sequence("r", list(prompt), SamplingParams(max_tokens=64, **sampling))
    seq.output_ids = list(output)
    return seq


def _ref_openai_penalties(row, output, presence, frequency):
    out = list(row)
    for j in range(len(out)):
        c = output.count(j)
        out[j] = out[j] - c * frequency - (1.0 if c > 0 else 0.0) * presence
    return out


def _ref_repetition(row, seen, r):
    return [(x / r if x > 0 else x * r) if j in seen else x for j, x in enumerate(row)]


def _ref_min_p(row, min_p, temperature):
    probs = torch.softmax(torch.tensor(row) / temperature, dim=-1).tolist()
    top = max(probs)
    return [x if p >= min_p * top else -math.inf for x, p in zip(row, probs)]


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, VOCAB) * 3


def test_presence_and_frequency_penalties_follow_openai(logits):
    seqs = [
        _seq([1, 2, 3], [5, 5, 7, 1], presence_penalty=0.7, frequency_penalty=0.4),
        _seq([4], [9, 9, 9], presence_penalty=-1.5, frequency_penalty=2.0),
        _seq([4], [], presence_penalty=2.0),  # nothing generated yet: nothing to penalise
        _seq([5], [3, 3]),
    ]  # no processors: untouched
    out = lp.process(logits, seqs)
    for i, seq in enumerate(seqs):
        s = seq.sampling
        expected = _ref_openai_penalties(logits[i].tolist(), seq.output_ids, s.presence_penalty, s.frequency_penalty)
        assert out[i].tolist() == pytest.approx(expected, abs=1e-5)
    assert not torch.equal(out[0], logits[0])  # it did something


def test_repetition_penalty_covers_prompt_and_output(logits):
    seqs = [_seq([1, 2, 3], [5, 8], repetition_penalty=1.3), _seq([0, 39], [7], repetition_penalty=0.8)]
    out = lp.process(logits[:2], seqs)
    for i, seq in enumerate(seqs):
        seen = set(seq.prompt_ids + seq.output_ids)
        expected = _ref_repetition(logits[i].tolist(), seen, seq.sampling.repetition_penalty)
        assert out[i].tolist() == pytest.approx(expected, abs=1e-5)


def test_logit_bias_adds_and_min_p_cuts_at_the_request_temperature(logits):
    bias = ((3, 5.0), (10, -100.0), (39, 0.5))
    seqs = [
        _seq([1], [], logit_bias=bias),
        _seq([1], [], min_p=0.2, temperature=0.7),
        _seq([1], [], min_p=0.2, temperature=0),
    ]  # greedy: min_p never removes the argmax, no-op
    out = lp.process(logits[:3], seqs)
    expected = logits[0].tolist()
    for token_id, value in bias:
        expected[token_id] += value
    assert out[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert out[1].tolist() == _ref_min_p(logits[1].tolist(), 0.2, 0.7)
    assert torch.equal(out[2], logits[2])


def test_raw_logits_are_not_modified(logits):
    before = logits.clone()
    lp.process(logits, [_seq([1], [1], frequency_penalty=1.0, logit_bias=((2, 3.0),), min_p=0.5)] * 4)
    assert torch.equal(logits, before)


def test_bounds_are_checked_and_named():
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty=-3)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    with pytest.raises(ValueError, match=r"logit_bias\[3\]"):
        SamplingParams(logit_bias=((3, 101.0),))


def test_parse_logit_bias_checks_ids_against_the_vocabulary():
    assert lp.parse_logit_bias({"7": 1, "2": -100}, VOCAB) == ((2, -100.0), (7, 1.0))
    assert lp.parse_logit_bias(None, VOCAB) == ()
    for bad, match in [
        ({"40": 1}, "not in the vocabulary"),
        ({"-1": 1}, "not a token id"),
        ({"x": 1}, "not a token id"),
        ({"1": 100.5}, "-100..100"),
        ({"1": True}, "-100..100"),
        ({str(i): 0 for i in range(lp.MAX_LOGIT_BIAS_TOKENS + 1)}, "at most"),
    ]:
        with pytest.raises(ValueError, match=match):
            lp.parse_logit_bias(bad, 10**6 if "at most" in match else VOCAB)


def test_engine_greedy_with_repetition_penalty_equals_hf_generate(tiny_base_dir):
    from tests.engine.helpers import hf_model
    from tests.engine.test_engine_parity import PROMPTS, tiny_engine

    engine = tiny_engine(tiny_base_dir)
    model = hf_model(tiny_base_dir)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    ours = engine.generate(PROMPTS[:2], sampling=sp)
    plain = engine.generate(PROMPTS[:2], sampling=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, got in zip(PROMPTS[:2], ours):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            ref = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                repetition_penalty=1.5,
                eos_token_id=None,
                pad_token_id=model.config.pad_token_id,
            )[0, len(prompt) :].tolist()
        assert got == ref
    assert ours != plain  # the penalty changed the greedy path, so the comparison proves something


def test_engine_logit_bias_forces_a_token(tiny_base_dir):
    from tests.engine.test_engine_parity import PROMPTS, tiny_engine

    engine = tiny_engine(tiny_base_dir)
    sp = SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True, logit_bias=((42, 100.0),), seed=3)
    assert engine.generate(PROMPTS[:2], sampling=sp) == [[42] * 6, [42] * 6]

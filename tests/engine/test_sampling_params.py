"""SamplingParams refuses out-of-contract values and normalises the rest; the sampler keeps each
row's trouble in its row (no model: logits are built by hand)."""

from __future__ import annotations

import pytest
import torch

from server.engine.sampler import Sampler
from server.engine.sequence import Sequence
from server.engine.types import SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", 2.01),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 2**31),
        ("top_k", 9223372036854775808),
        ("seed", 2**63),
        ("seed", -(2**63) - 1),
        ("seed", 18446744073709551616),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("min_tokens", 17),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", ("x",) * 17),
        ("stop", ("",)),
        ("stop", ("y" * 257,)),
        ("stop_token_ids", (-1,)),
        ("stop_token_ids", tuple(range(257))),
        ("max_tokens", 1.5),
        ("top_k", True),
    ],
)
def test_out_of_bounds_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_values_are_normalised():
    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=9.9e-6).temperature == 0
    assert SamplingParams(temperature=1e-5).temperature == pytest.approx(1e-5)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(seed=-1).seed == 2**64 - 1
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    SamplingParams(top_k=2**31 - 1, seed=-(2**63), logprobs=20, stop=("z" * 256,) * 16, max_tokens=1)


def seq(sampling: SamplingParams, eos=(2,)) -> Sequence:
    return Sequence(f"s{id(sampling)}", [1, 3], sampling, eos_ids=frozenset(eos))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_row_ends_alone_and_the_others_sample_as_alone(poison):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    poisoned = logits.clone()
    poisoned[1, 7] = poison
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, seed=5),
        SamplingParams(temperature=0.7, seed=3, top_k=2**31 - 1, logprobs=20),
    ]
    alone = [Sampler(seed=1).sample(logits[i : i + 1], [seq(p)])[0] for i, p in enumerate(params)]
    got = Sampler(seed=1).sample(poisoned, [seq(p) for p in params])
    assert got[1].token_id is None
    assert (got[1].error_code, got[1].error_status) == ("non_finite_output", 422)
    for i in (0, 2):
        assert got[i].error_code is None
        assert (got[i].token_id, got[i].logprob, got[i].top_logprobs) == (
            alone[i].token_id,
            alone[i].logprob,
            alone[i].top_logprobs,
        )


def test_tiny_temperature_and_huge_top_k_do_not_overflow():
    logits = torch.tensor([[3e38, 1.0, -3e38, 0.0]])
    out = Sampler(seed=0).sample(logits, [seq(SamplingParams(temperature=1e-5, top_k=2**31 - 1, seed=1))])
    assert out[0].token_id == 0 and out[0].error_code is None


def test_a_failing_draw_ends_only_its_row(monkeypatch):
    sampler = Sampler(seed=0)
    bad, good = seq(SamplingParams(temperature=1.0, seed=7)), seq(SamplingParams(temperature=1.0, seed=8))
    real = sampler._generator

    def generator(s):
        if s is bad:
            raise RuntimeError("an input nobody foresaw")
        return real(s)

    monkeypatch.setattr(sampler, "_generator", generator)
    out = sampler.sample(torch.zeros(2, 10), [bad, good])
    assert (out[0].token_id, out[0].error_code, out[0].error_status) == (None, "engine_error", 500)
    assert out[1].token_id is not None and out[1].error_code is None


def test_min_tokens_masks_eos_even_with_ignore_eos():
    """vLLM: ignore_eos lets EOS through as a token after min_tokens, never before it."""
    logits = torch.zeros(1, 10)
    logits[0, 2] = 10.0  # EOS is by far the likeliest token
    held = seq(SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, max_tokens=5))
    assert Sampler(seed=0).sample(logits, [held])[0].token_id != 2
    held.output_ids = [4, 4, 4]  # min_tokens reached: EOS is an ordinary token again
    assert Sampler(seed=0).sample(logits, [held])[0].token_id == 2
    text, reason = held.append_token(2)
    assert reason is None  # ignore_eos: EOS does not end the sequence


def test_stop_token_ids_outside_the_vocabulary_are_harmless():
    logits = torch.zeros(1, 10)
    s = seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(10**6,), max_tokens=4))
    assert Sampler(seed=0).sample(logits, [s])[0].error_code is None


def test_sampled_rows_below_min_tokens_never_draw_eos():
    """The mask reaches temperature sampling too, with and without other processing in the batch."""
    logits = torch.zeros(2, 10)
    logits[:, 2] = 8.0  # EOS holds nearly all the mass
    for other in (SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias=((5, 1.0),))):
        rows = [seq(SamplingParams(temperature=1.0, seed=s, min_tokens=3, max_tokens=5)) for s in range(40)]
        draws = [Sampler(seed=0).sample(logits, [r, seq(other)])[0].token_id for r in rows]
        assert 2 not in draws and len(set(draws)) > 1

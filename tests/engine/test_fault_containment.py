"""One sequence's trouble ends that sequence only: a poisoned adapter, an exception in the run,
and the KV blocks a poisoned sequence leaves behind. Everyone else's greedy tokens equal a solo run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.lora import MultiLoraLinear, build_lora_step
from server.engine.types import SamplingParams
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_dynamics import assert_released, drive
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine


@pytest.fixture(scope="module")
def refs(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("poison")
    good = make_adapter(root / "good", tiny_base_dir, 4, seed=21)
    # alpha 1e300: the fp32 scaling is inf, so every token through it turns non-finite
    poison = make_adapter(root / "poison", tiny_base_dir, 4, alpha=1e300, seed=22)
    return good, poison


def collect(engine, requests):
    """Submit (rid, prompt, adapter, sampling); step to the end; rid -> (tokens, last event)."""
    got: dict[str, list] = {}
    for rid, prompt, adapter, sampling in requests:
        got[rid] = []
        engine._submit(rid, prompt, adapter, sampling, got[rid].append)
    drive(engine, got)
    return {rid: ([e.token_id for e in evs if e.token_id is not None], evs[-1]) for rid, evs in got.items()}


# nf4: the batch shares the NF4 kernel's tiles; nf4 + bf16: the AMX kernel's (where AMX runs)
@pytest.mark.parametrize("quant,dtype", [("none", "float32"), ("nf4", "float32"), ("nf4", "bfloat16")])
def test_poisoned_adapter_ends_its_own_sequence_only(tiny_base_dir, refs, quant, dtype):
    good, poison = refs

    def batch(third, sampling):
        return [
            ("base", PROMPTS[0], None, GREEDY),
            ("good", PROMPTS[1], good, GREEDY),
            ("bad", PROMPTS[3], third, sampling),
            ("good2", PROMPTS[2], good, GREEDY),
        ]

    one = SamplingParams(max_tokens=1, temperature=0)

    def engine_for_the_batch():
        engine = tiny_engine(tiny_base_dir, quant=quant, dtype=dtype)
        if dtype != "float32":  # both adapters resident first: a load finishing mid-batch would
            engine.generate([PROMPTS[0]] * 2, [good, poison], one)  # change which steps a request joins
        return engine

    if dtype == "float32":  # the victims' tokens equal their run without the hostile request
        solo = tiny_engine(tiny_base_dir, quant=quant, dtype=dtype).generate(PROMPTS[:3], [None, good, good], GREEDY)
    else:  # bf16 rounds differently with the batch's shape (prefill padding, the LM head's GEMM),
        # so the reference is the same batch with a benign request that, like the hostile one,
        # leaves after its prefill
        benign = collect(engine_for_the_batch(), batch(None, one))
        solo = [benign[r][0] for r in ("base", "good", "good2")]
    engine = engine_for_the_batch()
    out = collect(engine, batch(poison, GREEDY))
    tokens, last = out["bad"]
    assert tokens == [] and last.finish_reason == "abort"
    assert (last.error_code, last.error_status) == ("non_finite_output", 422)
    assert "/" not in last.error
    assert [out[r][0] for r in ("base", "good", "good2")] == solo
    assert all(out[r][1].finish_reason == "length" and out[r][1].error is None for r in ("base", "good", "good2"))
    assert_released(engine)


def nonfinite_blocks(engine) -> set[int]:
    bs = engine.config.block_size
    bad = set()
    for layer in engine.model.model.layers:
        for cache in (layer.self_attn.k_cache, layer.self_attn.v_cache):
            per_block = torch.isfinite(cache.view(-1, bs, *cache.shape[1:])).flatten(1).all(dim=1)
            bad |= set((~per_block).nonzero().flatten().tolist())
    return bad


def test_kv_blocks_a_poisoned_sequence_left_are_clean_for_the_next(tiny_base_dir, refs, monkeypatch):
    _, poison = refs
    prompt = PROMPTS[3] + [7] * 10  # 30 tokens + 12 generated: 11 blocks
    solo = tiny_engine(tiny_base_dir).generate([prompt, PROMPTS[1]], sampling=GREEDY)
    engine = tiny_engine(tiny_base_dir, num_kv_blocks=16)
    bad = collect(engine, [("bad", PROMPTS[3], poison, SamplingParams(max_tokens=4, temperature=0))])
    assert bad["bad"][1].error_code == "non_finite_output"
    poisoned = nonfinite_blocks(engine)
    assert poisoned, "the poisoned sequence should have left non-finite K/V behind"
    reused = []
    take = engine.blocks.take_fresh

    def recording_take():
        fresh = take()
        reused.extend(fresh)
        return fresh

    monkeypatch.setattr(engine.blocks, "take_fresh", recording_take)
    out = collect(engine, [("long", prompt, None, GREEDY), ("short", PROMPTS[1], None, GREEDY)])
    assert len(poisoned & set(reused)) >= 4  # the base requests landed on the poisoned blocks
    assert [out["long"][0], out["short"][0]] == solo
    assert all(out[r][1].error is None for r in ("long", "short"))
    assert_released(engine)


def test_an_exception_for_one_sequence_ends_only_it(tiny_base_dir, monkeypatch):
    solo = tiny_engine(tiny_base_dir).generate(PROMPTS, sampling=GREEDY)
    engine = tiny_engine(tiny_base_dir)
    real_run = engine.runner.run
    runs = []

    def run(batch, fold_slot=None):
        runs.append(len(batch.entries))
        if any(e.seq.request_id == "doomed" and e.seq.output_ids for e in batch.entries):
            raise RuntimeError("an input nobody foresaw")  # fails once "doomed" has one token
        return real_run(batch, fold_slot)

    monkeypatch.setattr(engine.runner, "run", run)
    out = collect(
        engine,
        [(f"r{i}", p, None, GREEDY) for i, p in enumerate(PROMPTS[:2])]
        + [("doomed", PROMPTS[2], None, GREEDY), ("r3", PROMPTS[3], None, GREEDY)],
    )
    tokens, last = out["doomed"]
    assert tokens == solo[2][:1]
    assert (last.finish_reason, last.error_code, last.error_status) == ("abort", "engine_error", 500)
    assert "nobody foresaw" not in last.error  # no exception text reaches the client
    assert [out[r][0] for r in ("r0", "r1", "r3")] == [solo[0], solo[1], solo[3]]
    assert max(runs) == 4 and 1 in runs  # the failing batch was split down to the culprit
    assert_released(engine)


def test_lora_rows_are_bit_identical_with_and_without_a_poisoned_adapter():
    torch.manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(12, 18), 12, [("q", 6), ("k", 6), ("v", 6)], 3, 8, torch.float32, "cpu")

    def parts(scale):
        return {p: (torch.randn(4, 12), torch.randn(4, 6) * scale, 1.0) for p in ("q", "v")}

    layer.load_slot(1, parts(1.0))
    clean, poisoned = parts(1.0), parts(float("inf"))
    x = torch.randn(7, 12)
    slots = [0, 1, 1, 1, 2, 0, 1]  # slot 2 has fewer tokens: its group is padded
    step = build_lora_step(slots, 1, "cpu", torch.float32)
    layer.load_slot(2, clean)
    want = layer(x, step)
    layer.load_slot(2, poisoned)
    got = layer(x, step)
    others = [i for i, s in enumerate(slots) if s != 2]
    assert torch.equal(got[others], want[others])
    assert not torch.isfinite(got[4]).all()  # the poisoned adapter's own token


def test_a_failing_fold_runs_unfolded(tiny_base_dir, refs, monkeypatch):
    good, _ = refs
    want = tiny_engine(tiny_base_dir).generate(PROMPTS[:2], [good, good], GREEDY)
    engine = tiny_engine(tiny_base_dir, fold="pinned")
    engine.pin(good)

    def no_memory(slot, dtype=None):
        raise MemoryError("no room for dense copies")

    for layer in engine.fold.layers.values():
        monkeypatch.setattr(layer, "dense_weight", no_memory)
    assert engine.generate(PROMPTS[:2], [good, good], GREEDY) == want
    assert engine.fold.folded_id is None
    assert all(layer.folded_weight is None for layer in engine.fold.layers.values())
    assert_released(engine)


def test_a_failure_recording_one_token_ends_only_that_sequence(tiny_base_dir, monkeypatch):
    solo = tiny_engine(tiny_base_dir).generate(PROMPTS[:2], sampling=GREEDY)
    engine = tiny_engine(tiny_base_dir)
    events: dict[str, list] = {"a": [], "b": []}
    for rid, prompt in zip(events, PROMPTS[:2]):
        engine._submit(rid, prompt, None, GREEDY, events[rid].append)
    engine._drain_inbox()
    victim = next(s for s in engine.scheduler.waiting if s.request_id == "b")

    def broken(token_id):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer surprise")

    monkeypatch.setattr(victim.text, "append", broken)
    drive(engine, events)
    assert [e.token_id for e in events["a"]] == solo[0]
    assert (events["b"][-1].finish_reason, events["b"][-1].error_code) == ("abort", "engine_error")
    assert_released(engine)

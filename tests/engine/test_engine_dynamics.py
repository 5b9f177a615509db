"""Continuous batching under stress: joins mid-decode, preemption, aborts, slot eviction, fold.

Every run is checked against references (HF generate, or the roomy engine that the parity tests
tie to PEFT) and must leave no KV block or slot pin behind.
"""

from __future__ import annotations

import pytest

from server.engine.types import AdapterRef, SamplingParams
from tests.engine.helpers import hf_greedy, hf_model, make_adapter
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine


def assert_released(engine):
    engine.blocks.check()
    engine.slots.check()
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(p == 0 for p in engine.slots.pins)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def drive(engine, until_done: dict[str, list[int]]):
    """Step the engine (no loop thread) until every tracked request finished."""
    for _ in range(10_000):
        if not engine.scheduler.has_work() and engine._inbox.empty():
            return
        engine._drain_inbox()
        engine.step()
    raise AssertionError("engine made no progress")


def submit(engine, rid, prompt, adapter, sampling, sink):
    def put(ev):
        sink.setdefault(rid, [])
        if ev.token_id is not None:
            sink[rid].append(ev.token_id)
        if ev.finish_reason:
            sink[rid + ":finish"] = ev.finish_reason

    engine._submit(rid, prompt, adapter, sampling, put)


@pytest.fixture(scope="module")
def hf_refs(tiny_base_dir):
    model = hf_model(tiny_base_dir)
    return [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn-adapters")
    return [make_adapter(root / f"a{i}", tiny_base_dir, 4 + 2 * i, seed=10 + i) for i in range(5)]


def test_requests_joining_mid_decode(tiny_base_dir, hf_refs):
    engine = tiny_engine(tiny_base_dir)
    out: dict = {}
    submit(engine, "a", PROMPTS[0], None, GREEDY, out)
    submit(engine, "b", PROMPTS[1], None, GREEDY, out)
    for _ in range(5):
        engine._drain_inbox()
        engine.step()
    assert 0 < len(out["a"]) < GREEDY.max_tokens  # really mid-decode
    submit(engine, "c", PROMPTS[2], None, GREEDY, out)
    engine._drain_inbox()
    engine.step()
    submit(engine, "d", PROMPTS[3], None, GREEDY, out)
    drive(engine, out)
    assert [out[k] for k in "abcd"] == hf_refs
    assert_released(engine)


def test_preemption_by_recompute_keeps_outputs(tiny_base_dir, hf_refs):
    # 12 blocks of 4 = 48 positions; the four requests need 26 + 15 + 19 + 32 positions.
    engine = tiny_engine(tiny_base_dir, num_kv_blocks=12)
    got = engine.generate(PROMPTS, sampling=GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert got == hf_refs
    assert_released(engine)


def test_abort_frees_at_once_and_others_are_unchanged(tiny_base_dir, hf_refs):
    engine = tiny_engine(tiny_base_dir)
    out: dict = {}
    long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:3]):
        submit(engine, f"r{i}", p, None, GREEDY, out)
    submit(engine, "victim", [1, 7, 8, 9], None, long, out)
    for _ in range(4):
        engine._drain_inbox()
        engine.step()
    used = engine.blocks.num_used
    engine.abort("victim")
    engine._drain_inbox()
    assert out["victim:finish"] == "abort" and engine.blocks.num_used < used
    engine.blocks.check()
    drive(engine, out)
    assert [out[f"r{i}"] for i in range(3)] == hf_refs[:3]
    assert_released(engine)


def test_more_adapters_than_slots_all_complete(tiny_base_dir, adapters):
    prompts = [PROMPTS[i % 3] for i in range(10)]
    chosen = [adapters[i % 5] if i % 4 else None for i in range(10)]
    roomy = tiny_engine(tiny_base_dir, max_loras=5, max_cpu_loras=5).generate(prompts, chosen, GREEDY)
    tight = tiny_engine(tiny_base_dir, max_loras=2, max_cpu_loras=3, max_num_seqs=4)
    got = tight.generate(prompts, chosen, GREEDY)
    assert got == roomy
    assert tight.slots.stats.evictions > 0
    assert_released(tight)


def test_fold_equals_unfolded_and_unfolds_for_other_traffic(tiny_base_dir, adapters):
    a, b = adapters[1], adapters[2]
    plain = tiny_engine(tiny_base_dir, fold="off")
    want_a = plain.generate(PROMPTS, [a] * 4, GREEDY)
    want_mixed = plain.generate(PROMPTS[:2], [a, b], GREEDY)

    engine = tiny_engine(tiny_base_dir, fold="auto", fold_window=2)
    engine.pin(a)
    got_a = engine.generate(PROMPTS, [a] * 4, GREEDY)
    assert engine.fold.stats.folds == 1 and engine.stats().fold.folded == a.id
    assert got_a == want_a
    assert engine.generate(PROMPTS[:2], [a, b], GREEDY) == want_mixed
    engine.unpin(a.id)
    engine.generate([PROMPTS[0]], [b], GREEDY)  # b alone for > fold_window steps: auto fold
    assert engine.stats().fold.folded == b.id
    assert engine.generate(PROMPTS[:2], [a, b], GREEDY) == want_mixed  # mixed traffic unfolds b
    assert engine.stats().fold.folded is None
    assert_released(engine)


def test_forget_and_failed_adapter(tiny_base_dir, adapters, tmp_path):
    engine = tiny_engine(tiny_base_dir)
    engine.generate([PROMPTS[1]], [adapters[0]], GREEDY)
    assert engine.stats().adapters[adapters[0].id] == "device"
    engine.forget_adapter(adapters[0].id)
    engine._drain_inbox()
    assert adapters[0].id not in engine.stats().adapters
    assert all(owner is None for owner in engine.stats().slots.values())
    out: dict = {}
    submit(engine, "bad", PROMPTS[1], AdapterRef("missing", tmp_path / "nope"), GREEDY, out)
    submit(engine, "good", PROMPTS[1], None, GREEDY, out)
    drive(engine, out)
    assert out["bad:finish"] == "abort" and out["bad"] == []
    assert len(out["good"]) == GREEDY.max_tokens
    assert_released(engine)

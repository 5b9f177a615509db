"""Block manager and scheduler invariants, without a model or tokenizer."""

from __future__ import annotations

import random

import pytest

from server.engine.block_manager import BlockManager, NoFreeBlocks
from server.engine.scheduler import Scheduler
from server.engine.sequence import NO_SLOT, Sequence, SeqStatus
from server.engine.types import AdapterRef, SamplingParams


class FakeGate:
    """Adapters named in `loading` are not ready; pins are counted per slot."""

    def __init__(self, loading=()):
        self.loading = set(loading)
        self.pins: dict[int, int] = {}
        self.slot_of: dict[str | None, int] = {None: 0}

    def acquire(self, seq):
        if seq.adapter_id in self.loading:
            return False
        slot = self.slot_of.setdefault(seq.adapter_id, len(self.slot_of))
        seq.slot = slot
        self.pins[slot] = self.pins.get(slot, 0) + 1
        return True

    def release(self, seq):
        if seq.slot != NO_SLOT:
            self.pins[seq.slot] -= 1
            seq.slot = NO_SLOT

    def waits_for_slot(self, seq):
        return False  # slots are unbounded here


def make_seq(n_prompt, max_tokens=4, adapter=None, **kw):
    ref = AdapterRef(adapter, path=None) if adapter else None
    return Sequence(
        f"r{random.random()}",
        list(range(n_prompt)),
        SamplingParams(max_tokens=max_tokens, **kw),
        adapter=ref,
        eos_ids=frozenset({9999}),
    )


def run_to_completion(sched, max_steps=1000, token=7):
    steps = 0
    while sched.has_work():
        batch = sched.schedule()
        sched.blocks.check()
        sched.postprocess(batch, [token if e.samples else None for e in batch.entries])
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def test_block_manager_refcounts_and_free_list():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(5), make_seq(1)
    bm.allocate(a, 5)
    assert a.block_table == [0, 1] and bm.num_free == 2
    bm.share(a, b)
    assert bm.refcount(0) == 2
    bm.allocate(b, 9)  # one more, private block
    bm.check()
    with pytest.raises(NoFreeBlocks):
        bm.allocate(a, 17)
    bm.free(a)
    assert bm.refcount(0) == 1 and bm.num_free == 1
    bm.free(b)
    bm.check()
    assert bm.num_free == 4 and all(bm.refcount(i) == 0 for i in range(4))


def test_all_finish_and_release_everything():
    bm = BlockManager(num_blocks=64, block_size=4)
    gate = FakeGate()
    sched = Scheduler(bm, gate, max_num_seqs=3, max_num_batched_tokens=16)
    seqs = [
        make_seq(n, max_tokens=m, adapter=a)
        for n, m, a in [(3, 5, None), (10, 2, "x"), (25, 4, "y"), (1, 6, "x"), (7, 1, None)]
    ]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    assert all(s.status is SeqStatus.FINISHED and s.finish_reason == "length" for s in seqs)
    assert [len(s.output_ids) for s in seqs] == [5, 2, 4, 6, 1]
    assert bm.num_free == 64 and all(v == 0 for v in gate.pins.values())


def test_limits_respected_and_chunked_prefill():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, FakeGate(), max_num_seqs=2, max_num_batched_tokens=8)
    for n in (20, 3, 3):
        sched.add(make_seq(n, max_tokens=3))
    first = sched.schedule()
    assert first.num_tokens == 8 and len(first.entries) == 1 and not first.entries[0].samples
    sched.postprocess(first, [None])
    while sched.has_work():
        batch = sched.schedule()
        assert batch.num_tokens <= 8 and len(sched.running) <= 2
        sched.postprocess(batch, [1 if e.samples else None for e in batch.entries])


def test_preemption_by_recompute_keeps_outputs_and_frees_blocks():
    bm = BlockManager(num_blocks=6, block_size=4)  # 24 positions for 3 sequences of ~14
    gate = FakeGate()
    sched = Scheduler(bm, gate, max_num_seqs=3, max_num_batched_tokens=64)
    seqs = [make_seq(6, max_tokens=8) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    assert all(len(s.output_ids) == 8 for s in seqs)
    assert bm.num_free == 6 and all(v == 0 for v in gate.pins.values())


def test_abort_releases_at_once_and_loading_adapter_does_not_block_others():
    bm = BlockManager(num_blocks=32, block_size=4)
    gate = FakeGate(loading={"slow"})
    sched = Scheduler(bm, gate, max_num_seqs=4, max_num_batched_tokens=64)
    slow, fast, victim = make_seq(4, adapter="slow"), make_seq(4), make_seq(9, max_tokens=50)
    for s in (slow, fast, victim):
        sched.add(s)
    batch = sched.schedule()
    assert {e.seq.request_id for e in batch.entries} == {fast.request_id, victim.request_id}
    sched.postprocess(batch, [1, 1])
    assert sched.abort(victim.request_id) is victim
    bm.check()
    assert victim.finish_reason == "abort" and victim.block_table == [] and victim.slot == NO_SLOT
    gate.loading.clear()
    run_to_completion(sched)
    assert slow.status is SeqStatus.FINISHED and bm.num_free == 32
    assert all(v == 0 for v in gate.pins.values())


def test_stop_token_and_min_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(bm, FakeGate(), max_num_seqs=2, max_num_batched_tokens=64)
    eos_early = make_seq(3, max_tokens=10)
    held = make_seq(3, max_tokens=10, min_tokens=3)
    sched.add(eos_early)
    sched.add(held)
    run_to_completion(sched, token=9999)
    assert eos_early.output_ids == [9999] and eos_early.finish_reason == "stop"
    assert len(held.output_ids) == 4 and held.finish_reason == "stop"


def test_randomised_invariants():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=10, block_size=2)
    gate = FakeGate()
    sched = Scheduler(bm, gate, max_num_seqs=4, max_num_batched_tokens=12)
    live = []
    for _ in range(400):
        if rng.random() < 0.3:
            s = make_seq(rng.randint(1, 8), max_tokens=rng.randint(1, 6), adapter=rng.choice([None, "a", "b"]))
            sched.add(s)
            live.append(s)
        if live and rng.random() < 0.1:
            sched.abort(rng.choice(live).request_id)
        batch = sched.schedule()
        bm.check()
        held = sum(len(s.block_table) for s in sched.running)
        assert held == bm.num_used
        assert all(s.slot != NO_SLOT for s in sched.running)
        assert all(s.slot == NO_SLOT and not s.block_table for s in sched.waiting)
        sched.postprocess(batch, [rng.randint(0, 100) if e.samples else None for e in batch.entries])
    run_to_completion(sched)
    assert bm.num_free == 10 and all(v == 0 for v in gate.pins.values())

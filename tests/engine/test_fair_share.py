"""Tenants share slots and admission fairly (scheduler + fake gate, no tensors)."""

from __future__ import annotations

from server.engine.block_manager import BlockManager
from server.engine.fair_share import round_robin
from server.engine.scheduler import Scheduler
from server.engine.sequence import NO_SLOT, Sequence
from server.engine.types import AdapterRef, SamplingParams


class SlotGate:
    """`num_slots` slots; an adapter takes a free slot (or one nobody pins); pins per slot."""

    def __init__(self, num_slots):
        self.owner: dict[int, str | None] = {s: None for s in range(1, num_slots + 1)}
        self.pins = {s: 0 for s in self.owner}

    def acquire(self, seq):
        if seq.adapter is None:
            seq.slot = 0
            return True
        slot = next((s for s, a in self.owner.items() if a == seq.adapter_id), None)
        if slot is None:
            slot = next((s for s in self.owner if self.pins[s] == 0), None)
            if slot is None:
                return False
            self.owner[slot] = seq.adapter_id
        self.pins[slot] += 1
        seq.slot = slot
        return True

    def release(self, seq):
        if seq.slot not in (NO_SLOT, 0):
            self.pins[seq.slot] -= 1
        seq.slot = NO_SLOT

    def waits_for_slot(self, seq):
        """Every adapter is 'ready' here (no loading): it waits only when every slot is pinned."""
        if seq.adapter is None or seq.adapter_id in self.owner.values():
            return False
        return all(self.pins[s] for s in self.owner)

    def slots_of(self, running, tenant):
        return {s.slot for s in running if s.tenant == tenant and s.slot > 0}


def seq(tenant, adapter=None, max_tokens=50, n=4):
    ref = AdapterRef(adapter, path=None) if adapter else None
    return Sequence(
        f"{tenant}-{adapter}-{id(ref)}",
        list(range(n)),
        SamplingParams(max_tokens=max_tokens),
        adapter=ref,
        eos_ids=frozenset({9999}),
        tenant=tenant,
    )


def scheduler(num_slots=8, max_num_seqs=64):
    gate = SlotGate(num_slots)
    return Scheduler(BlockManager(1024, 4), gate, max_num_seqs, 4096, max_loras=num_slots), gate


def step(sched):
    batch = sched.schedule()
    sched.postprocess(batch, [7 if e.samples else None for e in batch.entries])
    return batch


def test_one_tenant_cannot_hold_every_slot_while_another_waits():
    sched, gate = scheduler(num_slots=8)
    for i in range(8):  # alice's long requests on 8 adapters arrive first...
        sched.add(seq("alice", f"a{i}"))
    for i in range(6):  # ...and bob's right behind them
        sched.add(seq("bob", f"b{i}"))
    step(sched)
    alice, bob = gate.slots_of(sched.running, "alice"), gate.slots_of(sched.running, "bob")
    assert len(alice) == 4 and len(bob) == 4  # ceil(8 / 2 tenants) each


def test_a_slot_left_over_goes_to_whoever_still_waits():
    sched, gate = scheduler(num_slots=8)
    for i in range(8):
        sched.add(seq("alice", f"a{i}"))
    for i in range(3):
        sched.add(seq("bob", f"b{i}"))
    step(sched)
    # bob needs only 3: once he waits for nothing, alice may go past her share
    assert len(gate.slots_of(sched.running, "bob")) == 3
    assert len(gate.slots_of(sched.running, "alice")) == 5


def test_alone_a_tenant_may_use_every_slot_and_yields_them_as_its_requests_end():
    sched, gate = scheduler(num_slots=4)
    for i in range(4):
        sched.add(seq("alice", f"a{i}", max_tokens=2 + i))
    step(sched)
    assert len(gate.slots_of(sched.running, "alice")) == 4  # nobody else waits
    for i in range(4):
        sched.add(seq("bob", f"b{i}"))
        sched.add(seq("alice", f"a{4 + i}"))
    for _ in range(10):
        step(sched)
    # alice's early requests ended; her slots went to bob up to his share, not back to her
    assert len(gate.slots_of(sched.running, "bob")) == 2
    assert len(gate.slots_of(sched.running, "alice")) == 2


def test_same_adapter_needs_no_new_slot_and_the_base_is_never_limited():
    sched, gate = scheduler(num_slots=2)
    sched.add(seq("alice", "a0"))
    sched.add(seq("bob", "b0"))
    sched.add(seq("bob", "b1"))
    for _ in range(3):
        sched.add(seq("alice", "a0"))  # same adapter: same slot
        sched.add(seq("alice"))  # the base
    step(sched)
    tenants = [(s.tenant, s.adapter_id) for s in sched.running]
    assert tenants.count(("alice", "a0")) == 4 and tenants.count(("alice", None)) == 3
    assert ("bob", "b0") in tenants and ("bob", "b1") not in tenants  # bob holds his share (1)


def test_admission_is_round_robin_across_tenants():
    sched, _ = scheduler(max_num_seqs=4)
    for _ in range(10):
        sched.add(seq("alice"))  # a burst
    sched.add(seq("bob"))
    sched.add(seq("carol"))
    batch = step(sched)
    assert sorted(e.seq.tenant for e in batch.entries) == ["alice", "alice", "bob", "carol"]


def test_round_robin_order_is_fifo_within_a_tenant_and_rotates():
    a = [seq("alice") for _ in range(3)]
    b = [seq("bob") for _ in range(2)]
    waiting = [a[0], a[1], b[0], a[2], b[1]]
    assert list(round_robin(waiting, None)) == [a[0], b[0], a[1], b[1], a[2]]
    assert list(round_robin(waiting, "alice")) == [b[0], a[0], b[1], a[1], a[2]]
    assert list(round_robin(a, "alice")) == a  # one tenant: plain FIFO


def test_fairness_keeps_the_invariants():
    sched, gate = scheduler(num_slots=3, max_num_seqs=8)
    for i in range(30):
        sched.add(seq(["alice", "bob", "carol"][i % 3], f"x{i % 7}", max_tokens=1 + i % 5))
    for _ in range(500):
        if not sched.has_work():
            break
        step(sched)
        sched.blocks.check()
        assert all(p >= 0 for p in gate.pins.values())
    assert not sched.has_work()
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert all(p == 0 for p in gate.pins.values())


def test_a_tenant_holding_every_slot_gives_one_back_to_a_newcomer():
    sched, gate = scheduler(num_slots=4)
    for i in range(4):
        sched.add(seq("alice", f"a{i}", max_tokens=40))
    step(sched)
    assert len(gate.slots_of(sched.running, "alice")) == 4  # she came first and alone
    sched.add(seq("bob", "b0", max_tokens=40))
    step(sched)
    assert len(gate.slots_of(sched.running, "bob")) == 1
    assert len(gate.slots_of(sched.running, "alice")) == 3
    assert sched.num_fair_preemptions == 1
    preempted = [s for s in sched.waiting if s.tenant == "alice"]
    assert len(preempted) == 1 and preempted[0].num_computed == 0  # recomputed from scratch later


def test_rebalancing_converges_to_equal_shares_and_then_stops():
    sched, gate = scheduler(num_slots=4)
    for i in range(4):
        sched.add(seq("alice", f"a{i}", max_tokens=200))
    step(sched)
    for i in range(4):
        sched.add(seq("bob", f"b{i}", max_tokens=200))
    for _ in range(6):
        step(sched)
    assert len(gate.slots_of(sched.running, "alice")) == 2
    assert len(gate.slots_of(sched.running, "bob")) == 2
    settled = sched.num_fair_preemptions
    assert settled == 2  # one slot per step, and no slot ever moves back
    for _ in range(20):
        step(sched)
    assert sched.num_fair_preemptions == settled


def test_no_preemption_when_moving_a_slot_would_not_narrow_the_gap():
    sched, gate = scheduler(num_slots=2)
    sched.add(seq("alice", "a0", max_tokens=40))
    sched.add(seq("bob", "b0", max_tokens=40))
    step(sched)
    sched.add(seq("carol", "c0"))  # alice and bob hold one slot each: carol waits her turn
    for _ in range(5):
        step(sched)
    assert sched.num_fair_preemptions == 0
    assert [s.tenant for s in sched.waiting] == ["carol"]


def test_content_shared_with_another_tenant_is_not_taken_away():
    sched, gate = scheduler(num_slots=3)
    sched.add(seq("alice", "shared", max_tokens=40))
    sched.add(seq("bob", "shared", max_tokens=40))  # same content id: one slot for both
    sched.add(seq("alice", "a1", max_tokens=40))
    sched.add(seq("alice", "a2", max_tokens=40))
    step(sched)
    sched.add(seq("carol", "c0"))
    step(sched)
    # alice holds 3 (one shared with bob): she gives back one of her own, never the shared one
    assert sched.num_fair_preemptions == 1
    assert any(s.adapter_id == "shared" and s.tenant == "bob" for s in sched.running)
    assert sum(s.adapter_id == "shared" for s in sched.running) == 2
    assert "c0" in {s.adapter_id for s in sched.running}

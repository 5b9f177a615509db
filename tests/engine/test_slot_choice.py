"""Which slot an eviction takes: the least recently used unpinned slot whose adapter no waiting
sequence needs, so a waiting sequence finds its adapter still resident instead of stalling on a
rewrite (issue 15 item 4). Real `AdapterSlots` and `Scheduler`, a tiny fused layer, no model."""

from __future__ import annotations

import torch

from server.engine.block_manager import BlockManager
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.slots import AdapterSlots
from server.engine.types import SamplingParams
from tests.engine.test_lora_slots import FakeModelLayers, acquire_blocking, write_adapter


def make_slots(num_slots=2, max_cpu=8):
    return AdapterSlots(
        FakeModelLayers(num_slots), num_slots=num_slots, max_cpu=max_cpu, max_rank=8, dtype=torch.float32
    )


def seq_for(ref, rid="r"):
    return Sequence(rid, [1, 2, 3], SamplingParams(max_tokens=2), adapter=ref, eos_ids=frozenset({9999}))


def load_all(slots, refs):
    """Each adapter into the host cache and a slot, then unpinned (the first is least recent)."""
    for ref in refs:
        seq = seq_for(ref)
        assert acquire_blocking(slots, seq)
        slots.release(seq)


def test_eviction_spares_an_adapter_a_waiting_sequence_needs(tmp_path):
    slots = make_slots()
    x, y, z = (write_adapter(tmp_path, name) for name in ("x", "y", "z"))
    load_all(slots, [x, y, z])  # z took x's slot (the LRU one): slots hold y, z
    load_all(slots, [x])  # x back in: y was least recently used
    assert set(slots.slot_of) == {"z", "x"}
    slots.keep_resident(frozenset({"z"}))  # z is least recently used now, but someone waits for it
    y_seq = seq_for(y)
    assert slots.acquire(y_seq)
    assert set(slots.slot_of) == {"z", "y"}  # x went, not z
    slots.release(y_seq)
    slots.keep_resident(frozenset({"z", "y"}))  # everything unpinned is wanted: plain LRU again
    x_seq = seq_for(x)
    assert slots.acquire(x_seq)
    assert set(slots.slot_of) == {"y", "x"}
    slots.check()


def test_without_waiting_demand_eviction_is_lru(tmp_path):
    slots = make_slots()
    x, y, z = (write_adapter(tmp_path, name) for name in ("x", "y", "z"))
    load_all(slots, [x, y])
    slots.keep_resident(frozenset())
    assert acquire_blocking(slots, seq_for(z))
    assert set(slots.slot_of) == {"y", "z"}


def test_scheduler_tells_the_slots_what_waits_and_loads_fewer(tmp_path):
    """Two slots, adapters x and y resident and unpinned; a waiting z then x: admitting z must not
    evict x (x's sequence waits behind it in the same step), so both run with one slot write."""
    slots = make_slots()
    x, y, z = (write_adapter(tmp_path, name) for name in ("x", "y", "z"))
    load_all(slots, [x, y])  # x is the least recently used slot
    load_all(slots, [z])  # z into the host cache (it took x's slot); bring x back over y
    load_all(slots, [x])
    assert set(slots.slot_of) == {"z", "x"}
    load_all(slots, [y])  # y evicts z (LRU); slots: x, y; z in the host cache
    assert set(slots.slot_of) == {"x", "y"}
    loads = slots.stats.loads
    sched = Scheduler(BlockManager(64, 4), slots, max_num_seqs=4, max_num_batched_tokens=64, max_loras=2)
    z_seq, x_seq = seq_for(z, "rz"), seq_for(x, "rx")
    sched.add(z_seq)
    sched.add(x_seq)
    batch = sched.schedule()
    assert {e.seq.request_id for e in batch.entries} == {"rz", "rx"}
    assert slots.stats.loads == loads + 1  # z replaced y; x kept its slot
    assert slots.owner[x_seq.slot] == "x" and slots.owner[z_seq.slot] == "z"
    slots.check()

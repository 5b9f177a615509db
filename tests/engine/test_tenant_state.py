"""Per-tenant engine state and loader isolation: pins and residency per (tenant, content id), a slow
adapter load that fails alone, and a host cache bounded in bytes."""

from __future__ import annotations

import threading

import pytest

import server.engine.slots as slots_module
from server.engine.types import AdapterRef, AdapterResidency
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_dynamics import assert_released, drive
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine


@pytest.fixture(scope="module")
def refs(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenant-adapters")
    return [make_adapter(root / f"t{i}", tiny_base_dir, 4, seed=30 + i) for i in range(3)]


def test_pins_are_per_tenant(tiny_base_dir, refs):
    engine = tiny_engine(tiny_base_dir, fold="pinned")
    shared = refs[0]  # identical bytes uploaded by both tenants: one content id
    engine.pin(shared, "alice")
    engine.pin(shared, "bob")
    engine._drain_inbox()
    engine.unpin(shared.id, "bob")
    engine._drain_inbox()
    assert shared.id in engine.fold.pinned  # alice's pin survives bob's unpin
    assert engine.tenant_residency("alice")[shared.id].pinned
    assert not engine.tenant_residency("bob")[shared.id].pinned  # bob pinned it in this residency
    assert engine.tenant_residency("carol") == {}
    engine.unpin(shared.id, "mallory")  # unpinning what one never pinned changes nothing
    engine._drain_inbox()
    assert shared.id in engine.fold.pinned
    engine.unpin(shared.id, "alice")
    engine._drain_inbox()
    assert shared.id not in engine.fold.pinned


def test_residency_shows_only_the_tenants_own_use(tiny_base_dir, refs):
    engine = tiny_engine(tiny_base_dir, fold="pinned")
    a, shared = refs[1], refs[2]
    engine.generate([PROMPTS[1], PROMPTS[2]], [a, shared], GREEDY, tenants=["alice", "alice"])
    assert engine.tenant_residency("alice") == {a.id: AdapterResidency("device"), shared.id: AdapterResidency("device")}
    assert engine.tenant_residency("bob") == {}  # same bytes resident for alice: bob sees nothing
    engine.pin(shared, "bob")
    bob = engine.tenant_residency("bob")
    assert list(bob) == [shared.id] and bob[shared.id].pinned  # his own pin, nothing of alice's
    assert not engine.tenant_residency("alice")[shared.id].pinned
    engine._drain_inbox()
    assert engine.tenant_residency("bob")[shared.id] == AdapterResidency("device", pinned=True)
    engine.unpin(shared.id, "bob")
    engine.forget_adapter(shared.id)  # out of memory: that residency ends for everyone
    engine._drain_inbox()
    engine.generate([PROMPTS[1]], [shared], GREEDY, tenants=["bob"])  # resident again, through bob only
    assert shared.id not in engine.tenant_residency("alice")
    assert engine.tenant_residency("bob")[shared.id].tier == "device"
    assert_released(engine)


def test_a_slow_load_fails_alone_and_does_not_block_other_loads(tiny_base_dir, refs, tmp_path, monkeypatch):
    slow = AdapterRef("slow", refs[0].path)
    release = threading.Event()
    real_read = slots_module.read_host_adapter

    def read(ref, *args):
        if ref.id == "slow":
            release.wait(timeout=60)  # a huge or stuck adapter, until the test ends
        return real_read(ref, *args)

    monkeypatch.setattr(slots_module, "read_host_adapter", read)
    engine = tiny_engine(tiny_base_dir, loader_threads=2, adapter_load_timeout_s=3.0)
    try:
        events: dict[str, list] = {}
        for rid, adapter in (("victim", slow), ("other", refs[1]), ("base", None)):
            events[rid] = []
            engine._submit(rid, PROMPTS[1], adapter, GREEDY, events[rid].append, tenant=rid)
        while not (events["other"] and events["other"][-1].finish_reason):
            engine._drain_inbox()
            engine.step()
        assert not events["victim"]  # the other tenant's load went ahead of the stuck one
        drive(engine, events)
        # asking again while the stuck read still holds its thread fails at once, taking no thread
        events["again"] = []
        engine._submit("again", PROMPTS[1], slow, GREEDY, events["again"].append, tenant="victim")
        drive(engine, events)
        assert events["again"][-1].error_code == "adapter_load_failed"
        assert len(engine.slots.loading) == 0
    finally:
        release.set()
    last = events["victim"][-1]
    assert (last.finish_reason, last.error_code, last.error_status) == ("abort", "adapter_load_failed", 503)
    assert "/" not in last.error
    assert [len(events[r]) for r in ("other", "base")] == [GREEDY.max_tokens] * 2
    assert engine.slots.stats.load_timeouts == 1
    assert_released(engine)
    engine.close()


def test_host_cache_is_bounded_in_bytes(tiny_base_dir, refs):
    engine = tiny_engine(tiny_base_dir, max_loras=1, max_cpu_loras=8)
    engine.generate([PROMPTS[1]], [refs[0]], GREEDY)
    one = engine.slots.host_bytes
    bounded = tiny_engine(tiny_base_dir, max_loras=1, max_cpu_loras=8, max_cpu_lora_bytes=int(one * 1.5))
    got = bounded.generate([PROMPTS[1]] * 3, refs, GREEDY)
    assert got == engine.generate([PROMPTS[1]] * 3, refs, GREEDY)
    assert len(bounded.slots.host) == 1 and bounded.slots.host_bytes <= int(one * 1.5)
    assert len(engine.slots.host) == 3
    assert_released(bounded)

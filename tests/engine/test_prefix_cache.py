"""Prefix caching: block identities, the cache index's invariants, and the scheduler using it
(no model here; tests/engine/test_prefix_cache_engine.py checks outputs on real weights)."""

from __future__ import annotations

import random

import pytest

from server.engine.block_manager import BlockManager
from server.engine.prefix_cache import FOLDED, LORA, block_hash, cache_key, weights_key
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.types import AdapterRef, SamplingParams
from tests.engine.test_scheduler import FakeGate, run_to_completion


def cached_seq(prompt, tenant="t", adapter=None, salt=None, scope="tenant", max_tokens=3):
    seq = Sequence(
        f"r{random.random()}",
        list(prompt),
        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        adapter=AdapterRef(adapter, path=None) if adapter else None,  # type: ignore[arg-type]
        tenant=tenant,
    )
    seq.cache_key = cache_key(scope, tenant, adapter, salt)
    return seq


def make_sched(num_blocks=64, block_size=4, max_num_seqs=8, budget=64):
    return Scheduler(BlockManager(num_blocks, block_size), FakeGate(), max_num_seqs, budget)


def serve(sched, *seqs):
    for s in seqs:
        sched.add(s)
    run_to_completion(sched)
    sched.blocks.check()
    assert all(sched.blocks.refcount(b) == 0 for b in range(sched.blocks.num_blocks))


def test_identities_name_tokens_parent_adapter_scope_salt_and_weights():
    key = cache_key("tenant", "t", "abc", None)
    h = block_hash(None, [1, 2, 3, 4], key)
    assert h == block_hash(None, [1, 2, 3, 4], cache_key("tenant", "t", "abc", None))
    others = [
        block_hash(None, [1, 2, 3, 5], key),
        block_hash(h, [1, 2, 3, 4], key),
        block_hash(None, [1, 2, 3, 4], cache_key("tenant", "t", "abd", None)),  # another content id
        block_hash(None, [1, 2, 3, 4], cache_key("tenant", "t", None, None)),  # the base
        block_hash(None, [1, 2, 3, 4], cache_key("tenant", "u", "abc", None)),  # another tenant
        block_hash(None, [1, 2, 3, 4], cache_key("tenant", "t", "abc", "salt")),
        block_hash(None, [1, 2, 3, 4], weights_key(key, FOLDED)),
    ]
    assert len({h, *others}) == len(others) + 1
    # global scope ignores the tenant; the parts are length-prefixed (no ambiguous concatenation)
    assert cache_key("global", "t", "abc", None) == cache_key("global", "u", "abc", None)
    assert cache_key("tenant", "ab", "c", None) != cache_key("tenant", "a", "bc", None)
    with pytest.raises(ValueError, match="prefix_cache_scope"):
        cache_key("everyone", "t", None, None)


def test_second_request_hits_whole_blocks_and_recomputes_the_last_token():
    sched = make_sched()
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks of 4 and a partial one
    a = cached_seq(prompt)
    serve(sched, a)
    assert a.num_cached_tokens == 0
    assert sched.blocks.num_cached >= 4  # prompt blocks plus full blocks written while decoding
    b = cached_seq(prompt)
    sched.add(b)
    batch = sched.schedule()
    assert [(e.start, e.num_new) for e in batch.entries] == [(16, 2)]  # only the rest is computed
    assert batch.fresh_blocks == [b.block_table[-1]]  # cached blocks are never zeroed again
    sched.postprocess(batch, [7])
    run_to_completion(sched)
    assert b.num_cached_tokens == 16
    # a prompt of exactly whole blocks still computes its last token (its logits are needed)
    c = cached_seq(prompt[:16])
    serve(sched, c)
    assert c.num_cached_tokens == 12
    assert (sched.blocks.cache_queries, sched.blocks.cache_hits) == (18 + 18 + 16, 28)


@pytest.mark.parametrize(
    "other",
    [
        dict(adapter="v2"),  # another version of the name: another content id
        dict(adapter=None),  # the base
        dict(tenant="u"),  # another tenant (default scope)
        dict(salt="s"),
    ],
)
def test_no_hit_across_adapters_versions_tenants_or_salts(other):
    sched = make_sched()
    prompt = list(range(200, 213))
    serve(sched, cached_seq(prompt, adapter="v1"))
    b = cached_seq(prompt, **({"adapter": "v1"} | other))
    serve(sched, b)
    assert b.num_cached_tokens == 0


def test_global_scope_shares_across_tenants():
    sched = make_sched()
    prompt = list(range(300, 313))
    serve(sched, cached_seq(prompt, tenant="a", scope="global"))
    b = cached_seq(prompt, tenant="b", scope="global")
    serve(sched, b)
    assert b.num_cached_tokens == 12


def test_blocks_computed_under_other_weights_are_neither_hit_nor_registered():
    weights = {"w": LORA}
    sched = Scheduler(BlockManager(64, 4), FakeGate(), 8, 64, weights_for=lambda seq: weights["w"])
    prompt = list(range(400, 413))
    serve(sched, cached_seq(prompt, adapter="x"))
    weights["w"] = FOLDED  # the adapter is folded now: its sequences compute under dense weights
    b = cached_seq(prompt, adapter="x")
    serve(sched, b)
    assert b.num_cached_tokens == 0
    # a sequence admitted under LORA whose steps then run folded registers nothing from there on
    weights["w"] = LORA
    c = cached_seq(list(range(500, 513)), adapter="x")
    sched.add(c)
    batch = sched.schedule()
    sched.ran_under(batch, FOLDED)
    sched.postprocess(batch, [7 if e.samples else None for e in batch.entries])
    run_to_completion(sched)
    d = cached_seq(list(range(500, 513)), adapter="x")
    serve(sched, d)
    assert d.num_cached_tokens == 0


def test_eviction_takes_free_blocks_first_then_the_least_recently_used():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = cached_seq([1, 2, 3, 4, 5]), cached_seq([9, 8, 7, 6, 5])
    for s in (a, b):
        bm.allocate(s, 4)
        s.num_computed = 4
        bm.register(s)
    bm.free(a)
    bm.free(b)
    assert bm.num_free == 6 and bm.num_cached == 4
    bm.check()
    filler = cached_seq([42] * 5)
    bm.allocate(filler, 6)  # the two truly free blocks, then a's tail (the oldest evictable)
    assert bm.num_cached == 3
    bm.check()
    again_a, again_b = cached_seq([1, 2, 3, 4, 5]), cached_seq([9, 8, 7, 6, 5])
    assert bm.match_prefix(again_a) == 2  # a's first block outlived its tail
    assert bm.match_prefix(again_b) == 4
    bm.check()
    for s in (filler, again_a, again_b):
        bm.free(s)
    bm.check()
    assert bm.num_free == 6


def test_same_prefix_in_flight_is_computed_once():
    sched = make_sched(budget=8)  # the 13-token prompt takes two steps
    prompt = list(range(600, 613))
    first, second = cached_seq(prompt), cached_seq(prompt)
    serve(sched, first, second)
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 12


def test_same_prompt_copies_the_held_tail_and_computes_only_the_last_token():
    sched = make_sched(max_num_seqs=8, budget=64)
    prompt = list(range(700, 714))  # 14 tokens: 3 full blocks of 4 and a tail of 2
    leader, others = cached_seq(prompt, max_tokens=5), [cached_seq(prompt, max_tokens=5) for _ in range(3)]
    for s in (leader, *others):
        sched.add(s)
    first = sched.schedule()
    assert [(e.seq, e.start, e.num_new) for e in first.entries] == [(leader, 0, 14)]  # the others wait
    sched.postprocess(first, [7])
    second = sched.schedule()
    tail = leader.block_table[3]
    assert {(e.start, e.num_new) for e in second.entries if e.seq is not leader} == {(13, 1)}
    assert sorted(second.copies) == sorted((tail, s.block_table[3], 2) for s in others)
    assert all(s.block_table[:3] == leader.block_table[:3] for s in others)  # full blocks shared
    assert set(second.fresh_blocks) >= {s.block_table[3] for s in others}  # zeroed, then copied into
    sched.postprocess(second, [7 if e.samples else None for e in second.entries])
    run_to_completion(sched)
    assert [s.num_cached_tokens for s in others] == [13, 13, 13]
    sched.blocks.check()
    assert all(sched.blocks.refcount(b) == 0 for b in range(sched.blocks.num_blocks))


def test_randomized_workload_leaves_no_reference_behind():
    rng = random.Random(0)
    sched = make_sched(num_blocks=18, block_size=4, max_num_seqs=5, budget=16)
    stems = [[rng.randrange(1000) for _ in range(rng.randrange(4, 20))] for _ in range(4)]
    copied = [0]
    for _ in range(400):
        if rng.random() < 0.3:
            prompt = rng.choice(stems) + [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
            who = dict(tenant=rng.choice("ab"), adapter=rng.choice([None, "x"]), scope=rng.choice(["tenant", "global"]))
            for _ in range(rng.choice([1, 1, 3])):  # a burst of one prompt (n > 1): tails are copied
                sched.add(cached_seq(prompt, **who, max_tokens=rng.randrange(1, 10)))
        if rng.random() < 0.05 and (sched.running or sched.waiting):
            sched.abort(rng.choice(list(sched.running) + list(sched.waiting)).request_id)
        if sched.has_work():
            batch = sched.schedule()
            copied[0] += len(batch.copies)
            if batch:
                sched.ran_under(batch, rng.choice([LORA, LORA, LORA, FOLDED]))
            sched.postprocess(batch, [rng.randrange(1000) if e.samples else None for e in batch.entries])
        sched.blocks.check()
    run_to_completion(sched)
    sched.blocks.check()
    assert all(sched.blocks.refcount(b) == 0 for b in range(sched.blocks.num_blocks))
    assert sched.num_preemptions > 0 and sched.blocks.cache_hits > 0 and copied[0] > 0

"""Prefix caching on real weights: cached runs give exactly the uncached tokens, and nothing is
shared across adapters, versions, tenants or weights (fold)."""

from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from tests.engine.helpers import hf_greedy, hf_model, make_adapter
from tests.engine.test_engine_bases import chat_prompts
from tests.engine.test_engine_dynamics import assert_released, submit
from tests.engine.test_engine_parity import GREEDY, tiny_engine

SYSTEM = list(range(40, 71))  # 31 shared tokens: 7 full blocks of 4 and 3 more
TURNS = [SYSTEM + [200 + i, 201 + i, 202 + i, 203 + i, 204 + i] for i in range(4)]


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    return [make_adapter(root / f"p{i}", tiny_base_dir, 4, seed=30 + i) for i in range(2)]


def run_one(engine, prompt, adapter=None, tenant="default", sampling=GREEDY, salt=None):
    """(tokens, cached_tokens) of one request run alone."""
    events = []
    sp = sampling if salt is None else SamplingParams(**{**vars(sampling), "cache_salt": salt})
    engine._submit(f"one-{len(engine._live)}-{id(events)}", prompt, adapter, sp, events.append, tenant)
    engine.run_until(lambda: bool(events) and events[-1].finish_reason is not None)
    return [e.token_id for e in events if e.token_id is not None], events[-1].cached_tokens


def test_cached_greedy_tokens_equal_uncached_and_hf(tiny_base_dir, adapters):
    plain = tiny_engine(tiny_base_dir, enable_prefix_caching=False)
    engine = tiny_engine(tiny_base_dir)
    for adapter in (None, adapters[0]):
        want = [plain.generate([p], [adapter], GREEDY)[0] for p in TURNS]
        got = [run_one(engine, p, adapter) for p in TURNS]
        assert [tokens for tokens, _ in got] == want
        assert [cached for _, cached in got] == [0, 28, 28, 28]
    model = hf_model(tiny_base_dir)
    assert [run_one(engine, p)[0] for p in TURNS[:2]] == [hf_greedy(model, p, GREEDY.max_tokens) for p in TURNS[:2]]
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0 and 0 < stats.prefix_cache_hit_rate < 1
    assert_released(engine)


def test_concurrent_requests_on_one_prefix_compute_it_once(tiny_base_dir):
    plain = tiny_engine(tiny_base_dir, enable_prefix_caching=False)
    engine = tiny_engine(tiny_base_dir)
    assert engine.generate(TURNS, sampling=GREEDY) == plain.generate(TURNS, sampling=GREEDY)
    assert engine.stats().prefix_cache_hits == 3 * 28  # the first computed the system prompt alone
    assert_released(engine)


def test_no_hit_across_adapters_versions_tenants_or_salts(tiny_base_dir, adapters):
    engine = tiny_engine(tiny_base_dir)
    a, a_v2 = adapters  # two contents: as a re-upload of one name gets a new content id
    prompt = TURNS[0]
    assert run_one(engine, prompt, a, tenant="t")[1] == 0
    assert run_one(engine, prompt, a_v2, tenant="t")[1] == 0
    assert run_one(engine, prompt, None, tenant="t")[1] == 0
    assert run_one(engine, prompt, a, tenant="u")[1] == 0  # tenant scope: u cannot time t's prompts
    assert run_one(engine, prompt, a, tenant="t", salt="s1")[1] == 0
    assert run_one(engine, prompt, a, tenant="t", salt="s1")[1] == 32  # 36 tokens: all but the last block
    assert run_one(engine, prompt, a, tenant="t")[1] == 32
    shared = tiny_engine(tiny_base_dir, prefix_cache_scope="global")
    assert run_one(shared, prompt, a, tenant="t")[1] == 0
    assert run_one(shared, prompt, a, tenant="u")[1] == 32
    assert_released(engine)


def test_no_hit_across_a_fold_change(tiny_base_dir, adapters):
    a = adapters[0]
    plain = tiny_engine(tiny_base_dir, enable_prefix_caching=False)
    engine = tiny_engine(tiny_base_dir, fold="pinned")
    tokens, cached = run_one(engine, TURNS[0], a)  # unfolded
    assert cached == 0
    engine.pin(a)
    engine._drain_inbox()
    run_one(engine, TURNS[3], None)  # base traffic: the pinned fold is built on a's next batch
    folded, cached = run_one(engine, TURNS[1], a)
    assert engine.stats().fold.folded == a.id
    assert cached == 0  # blocks computed unfolded are not reused under the folded weights
    assert engine.stats().fold.folded == a.id
    assert folded == plain.generate([TURNS[1]], [a], GREEDY)[0]  # fp32: folding keeps greedy tokens
    again, cached = run_one(engine, TURNS[2], a)
    assert cached == 28  # the folded weights' own blocks are
    engine.unpin(a.id)
    engine._drain_inbox()
    run_one(engine, TURNS[3], None)  # other traffic unfolds
    assert engine.stats().fold.folded is None
    assert run_one(engine, TURNS[1], a)[1] == 28  # the unfolded blocks of the first request
    assert plain.generate([TURNS[0]], [a], GREEDY)[0] == tokens
    assert_released(engine)


def test_eviction_under_memory_pressure_keeps_outputs(tiny_base_dir, adapters):
    prompts = [TURNS[i % 4][: 20 + 3 * i] for i in range(8)]
    chosen = [adapters[i % 2] if i % 3 else None for i in range(8)]
    want = tiny_engine(tiny_base_dir, enable_prefix_caching=False).generate(prompts, chosen, GREEDY)
    engine = tiny_engine(tiny_base_dir, num_kv_blocks=14, max_num_seqs=3)
    out: dict = {}
    for round_ in range(2):
        for i, (p, a) in enumerate(zip(prompts, chosen)):
            submit(engine, f"{round_}-{i}", p, a, GREEDY, out)
        finished = 8 * (round_ + 1)
        engine.run_until(lambda finished=finished: sum(k.endswith(":finish") for k in out) == finished)
        assert [out[f"{round_}-{i}"] for i in range(8)] == want
        engine.blocks.check()
    assert engine.stats().prefix_cache_hits > 0
    assert_released(engine)


def test_default_base_cached_equals_uncached(default_base_dir):
    def engine(caching: bool) -> Engine:
        return Engine(
            EngineConfig(
                base=default_base_dir,
                quant="none",
                dtype="float32",
                device="cpu",
                max_model_len=512,
                kv_cache_bytes=64 * 2**20,
                fold="off",
                enable_prefix_caching=caching,
            )
        )

    cached = engine(True)
    system = {"role": "system", "content": "You are a terse assistant who answers every question in a few words."}
    turns = chat_prompts(cached.tokenizer, [[system, {"role": "user", "content": q}] for q in ("Colour?", "Fruit?")])
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    got = [run_one(cached, p, sampling=sp) for p in turns + turns]
    assert got[2][1] > 0 and got[3][1] > 0
    want = engine(False).generate(turns, sampling=sp)
    assert [tokens for tokens, _ in got] == want + want


def test_n_samples_share_the_prompt_and_copy_its_tail(tiny_base_dir, adapters):
    """Four seeded samples of one prompt (as the API's n=4 sends them) equal four unshared runs:
    the full blocks are shared, the partial tail is copied into each sample's own block."""
    from server.api.parallel import choice_sampling

    prompt = TURNS[0][:34]  # 8 full blocks of 4 and a tail of 2
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    params = [choice_sampling(sampled, i) for i in range(4)]
    for adapter in (None, adapters[1]):
        plain = tiny_engine(tiny_base_dir, enable_prefix_caching=False)
        want = [plain.generate([prompt], [adapter], sp)[0] for sp in params]
        engine = tiny_engine(tiny_base_dir)
        got = engine.generate([prompt] * 4, [adapter] * 4, params)
        assert got == want and len({tuple(t) for t in want}) > 1
        assert engine.stats().prefix_cache_hits == 3 * 33  # every token but the last, three times
        assert_released(engine)

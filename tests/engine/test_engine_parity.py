"""Engine greedy tokens against Hugging Face `generate` and PEFT, on the tiny base (fp32)."""

from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from tests.engine.helpers import hf_greedy, hf_model, make_adapter, peft_greedy

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [
    [1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
    [1, 20, 21],
    [1, 30, 31, 32, 33, 34, 35],
    [1, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116, 117],
]


def tiny_engine(base, **kw) -> Engine:
    params = dict(
        base=base,
        quant="none",
        dtype="float32",
        device="cpu",
        max_loras=4,
        max_cpu_loras=8,
        max_model_len=256,
        block_size=4,
        num_kv_blocks=128,
        max_num_batched_tokens=32,
        fold="off",
    )
    params.update(kw)
    return Engine(EngineConfig(**params))


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(root / "qv4", tiny_base_dir, 4, ("q_proj", "v_proj"), seed=1),
        make_adapter(root / "all8", tiny_base_dir, 8, seed=2),
        make_adapter(root / "rs16", tiny_base_dir, 16, use_rslora=True, alpha=8, seed=3),
        make_adapter(
            root / "mlp", tiny_base_dir, 6, ("gate_proj", "up_proj", "down_proj"), seed=4, rank_pattern={"down_proj": 2}
        ),
    ]


def test_base_greedy_equals_hf_generate(tiny_base_dir):
    engine = tiny_engine(tiny_base_dir)
    got = engine.generate(PROMPTS, sampling=GREEDY)
    model = hf_model(tiny_base_dir)
    assert got == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]


def test_eos_stops_like_hf(tiny_base_dir):
    engine = tiny_engine(tiny_base_dir)
    model = hf_model(tiny_base_dir)
    sp = SamplingParams(max_tokens=40, temperature=0)
    prompts = [[1, 2, 3], [1, 40, 41, 42]] + PROMPTS
    got = engine.generate(prompts, sampling=sp)
    for p, tokens in zip(prompts, got):
        ref = hf_greedy(model, p, 40, stop_at_eos=True)
        if 2 in ref:  # HF pads after eos with pad_token_id (also 2)
            ref = ref[: ref.index(2) + 1]
        assert tokens == ref


def test_mixed_adapters_batch_equals_peft(tiny_base_dir, adapters):
    engine = tiny_engine(tiny_base_dir)
    # every prompt under every adapter and the base, all in one run of the engine
    requests = [(p, a) for a in [None, *adapters] for p in PROMPTS[:3]]
    got = engine.generate([p for p, _ in requests], [a for _, a in requests], GREEDY)
    base = [hf_greedy(hf_model(tiny_base_dir), p, GREEDY.max_tokens) for p in PROMPTS[:3]]
    assert got[:3] == base
    for i, adapter in enumerate(adapters):
        ref = peft_greedy(tiny_base_dir, adapter, PROMPTS[:3], GREEDY.max_tokens)
        assert got[3 * (i + 1) : 3 * (i + 2)] == ref, adapter.id
        assert ref != base, f"adapter {adapter.id} does not change the output; the test proves nothing"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(p == 0 for p in engine.slots.pins)

"""A tenant that took every adapter slot gives one back to a newcomer, in the real engine.

carol's two long requests hold both slots before bob arrives; bob's request must finish while
hers still run, and her preempted request (recomputed from scratch) must still produce exactly
the tokens it produces alone (tiny base, fp32, greedy).
"""

from __future__ import annotations

import pytest

from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.types import SamplingParams
from tests.engine.helpers import make_adapter

LONG = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = {"carol-0": [1, 5, 6, 7, 8], "carol-1": [1, 20, 21, 22], "bob": [1, 30, 31, 32, 33, 34]}


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rebalance")
    return {
        "carol-0": make_adapter(root / "c0", tiny_base_dir, 4, seed=11),
        "carol-1": make_adapter(root / "c1", tiny_base_dir, 4, seed=12),
        "bob": make_adapter(root / "b", tiny_base_dir, 4, seed=13),
    }


def core(base) -> EngineCore:
    return EngineCore(
        EngineConfig(
            base=base,
            quant="none",
            dtype="float32",
            device="cpu",
            max_loras=2,
            max_cpu_loras=8,
            max_model_len=128,
            block_size=4,
            num_kv_blocks=64,
            max_num_batched_tokens=32,
            fold="off",
        )
    )


def test_newcomer_is_served_while_the_slot_holder_still_runs(tiny_base_dir, adapters):
    engine = core(tiny_base_dir)
    tokens: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    finished: dict[str, str] = {}

    def sink(rid):
        def put(event):
            if event.token_id is not None:
                tokens[rid].append(event.token_id)
            if event.finish_reason is not None:
                finished[rid] = event.finish_reason

        return put

    for rid in ("carol-0", "carol-1"):
        engine._submit(rid, PROMPTS[rid], adapters[rid], LONG, sink(rid), tenant="carol")
    engine.run_until(lambda: all(len(tokens[r]) >= 3 for r in ("carol-0", "carol-1")))
    engine._submit("bob", PROMPTS["bob"], adapters["bob"], SHORT, sink("bob"), tenant="bob")
    engine.run_until(lambda: "bob" in finished)
    assert finished["bob"] == "length"
    assert "carol-0" not in finished and "carol-1" not in finished, "bob waited for carol's requests to end"
    assert engine.scheduler.num_fair_preemptions == 1
    engine.run_until(lambda: len(finished) == 3)

    for rid, sampling, tenant in (("carol-0", LONG, "carol"), ("carol-1", LONG, "carol"), ("bob", SHORT, "bob")):
        alone = engine.generate([PROMPTS[rid]], [adapters[rid]], sampling, [tenant])[0]
        assert tokens[rid] == alone, f"{rid}: output changed by the preemption"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(p == 0 for p in engine.slots.pins)
    engine.close()

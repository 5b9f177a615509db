"""The multi-LoRA layer against a per-adapter loop, and slot residency invariants (no model)."""

from __future__ import annotations

import random
import time

import pytest
import torch
from torch import nn

from adapters.format import LoraModule, LoraWeights, peft_config, write_peft
from server.engine.lora import MultiLoraLinear, build_lora_step
from server.engine.sequence import NO_SLOT, Sequence
from server.engine.slots import AdapterSlots
from server.engine.types import AdapterRef, SamplingParams


PARTS = [("q", 6), ("k", 6), ("v", 6)]  # a fused layer, out 18


def make_layer(num_slots=4, ranks=(3, 8, 5, 1), seed=0):
    """Slot s adapts q and v with rank ranks[s-1]; slot 2 also adapts k with rank 2."""
    torch.manual_seed(seed)
    layer = MultiLoraLinear(nn.Linear(12, 18), 12, PARTS, num_slots, 16, torch.float32, "cpu")
    mods = {}
    for slot, r in enumerate(ranks, start=1):
        parts = {"q": (torch.randn(r, 12), torch.randn(6, r), 0.5), "v": (torch.randn(r, 12), torch.randn(6, r), 1.0)}
        if slot == 2:
            parts["k"] = (torch.randn(2, 12), torch.randn(6, 2), 2.0)
        layer.load_slot(slot, {k: (A, B.t().contiguous(), sc) for k, (A, B, sc) in parts.items()})
        mods[slot] = parts
    return layer, mods


def delta(parts, x):
    """The reference: each part's B @ A @ x, in its own output rows."""
    out, offset = torch.zeros(18), 0
    for name, size in PARTS:
        if name in parts:
            A, B, scaling = parts[name]
            out[offset : offset + size] = scaling * (B @ (A @ x))
        offset += size
    return out


@pytest.mark.parametrize(
    "slots",
    [
        [1, 2, 3, 4, 0, 0, 2, 2, 1],  # uneven, with base tokens
        [2, 2, 2],  # one adapter: the two-matmul path
        [1, 1, 3, 3, 4, 4],  # even groups: no padding mask
        [0, 0],  # base only
    ],
)
def test_lora_layer_equals_per_adapter_loop(slots):
    layer, mods = make_layer()
    x = torch.randn(len(slots), 12)
    step = build_lora_step(slots, version=1, device="cpu", dtype=torch.float32)
    got = layer(x, step)
    want = layer.base(x)
    for i, s in enumerate(slots):  # the reference: a Python loop over tokens / adapters
        if s:
            want[i] += delta(mods[s], x[i])
    torch.testing.assert_close(got, want)


def test_slot_reload_overwrites_higher_rank_with_lower():
    layer, mods = make_layer()
    small = {"v": (torch.ones(2, 12), torch.ones(6, 2), 0.25)}
    layer.load_slot(2, {k: (A, B.t().contiguous(), sc) for k, (A, B, sc) in small.items()})
    x = torch.randn(3, 12)
    for slots in ([2, 2, 2], [2, 1, 0]):
        step = build_lora_step(slots, 2, "cpu", torch.float32)
        got = layer(x, step)
        torch.testing.assert_close(got[0], layer.base(x)[0] + delta(small, x[0]))


def test_dense_weight_is_w0_plus_delta():
    layer, mods = make_layer()
    eye = torch.eye(12)
    dense_delta = torch.stack([delta(mods[2], eye[:, j]) for j in range(12)], dim=1)  # (18, 12)
    torch.testing.assert_close(layer.dense_weight(2), layer.base.weight + dense_delta)


class FakeModelLayers(dict):
    """PEFT module paths -> (a fused q/v layer, part), as `CausalLM.lora_targets()` gives."""

    def __init__(self, num_slots):
        layer = MultiLoraLinear(nn.Linear(8, 16), 8, [("q_proj", 8), ("v_proj", 8)], num_slots, 8, torch.float32, "cpu")
        super().__init__({f"model.layers.0.self_attn.{p}": (layer, p) for p in ("q_proj", "v_proj")})


def write_adapter(root, name, rank=2):
    mods = {
        f"model.layers.0.self_attn.{p}": LoraModule(torch.randn(rank, 8), torch.randn(8, rank), 1.0)
        for p in ("q_proj", "v_proj")
    }
    write_peft(LoraWeights(peft_config(rank, rank, ["q_proj", "v_proj"]), mods), root / name)
    return AdapterRef(name, root / name)


def acquire_blocking(slots, seq, timeout=10.0):
    end = time.time() + timeout
    while not slots.acquire(seq):
        if seq.adapter.id not in slots.loading:
            return False  # resident but every slot pinned, or failed
        slots.wait_for_loads(0.05)
        slots.poll()
        if time.time() > end:
            raise TimeoutError
    return True


def test_slots_never_evict_a_pinned_slot(tmp_path):
    layers = FakeModelLayers(num_slots=2)
    slots = AdapterSlots(layers, num_slots=2, max_cpu=3, max_rank=8, dtype=torch.float32)
    refs = [write_adapter(tmp_path, f"a{i}") for i in range(5)]
    rng = random.Random(0)
    holders: list[Sequence] = []
    for _ in range(300):
        if holders and rng.random() < 0.5:
            slots.release(holders.pop(rng.randrange(len(holders))))
        else:
            seq = Sequence("r", [1], SamplingParams(), adapter=rng.choice(refs))
            pinned_before = {s: slots.owner[s] for s in range(1, 3) if slots.pins[s]}
            if acquire_blocking(slots, seq):
                holders.append(seq)
                assert slots.owner[seq.slot] == seq.adapter.id
            else:
                assert all(slots.pins[s] for s in range(1, 3))  # refused only when all are pinned
            for s, owner in pinned_before.items():
                assert slots.owner[s] == owner, "a pinned slot was evicted"
        slots.check()
        assert len(slots.host) <= 3
        for seq in holders:
            assert slots.owner[seq.slot] == seq.adapter.id
            # the slot really holds this adapter's weights
            assert layers["model.layers.0.self_attn.q_proj"][0].slot_rank[seq.slot] == 2
    for seq in holders:
        slots.release(seq)
        assert seq.slot == NO_SLOT
    assert all(p == 0 for p in slots.pins) and slots.stats.evictions > 0
    slots.shutdown()


def test_rank_above_limit_fails_to_load(tmp_path):
    slots = AdapterSlots(FakeModelLayers(2), num_slots=2, max_cpu=2, max_rank=4, dtype=torch.float32)
    ref = write_adapter(tmp_path, "big", rank=6)
    seq = Sequence("r", [1], SamplingParams(), adapter=ref)
    assert not acquire_blocking(slots, seq)
    assert "rank 6" in slots.failed["big"]
    slots.shutdown()

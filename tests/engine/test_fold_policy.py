"""Cost-aware, sliced fold (issue 15, item 3) and the grouped LoRA path's gather back (item 1).

The fold manager is driven directly over `MultiLoraLinear` layers (no model), so the number of
steps a build takes and the cost gate are exact; the engine-level test checks that one request at
a time over rotating adapters never starts a build and serves exactly what fold="off" serves.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from server.engine.fold import FoldManager
from server.engine.lora import MultiLoraLinear, build_lora_step
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine
from tests.engine.test_lora_slots import delta, make_layer


def layers(n=3, seed=0):
    """n fused layers (out 18, in 12) with adapters of rank 4 in slots 1 and 2."""
    torch.manual_seed(seed)
    out = {}
    for i in range(n):
        layer = MultiLoraLinear(nn.Linear(12, 18), 12, [("q", 6), ("k", 6), ("v", 6)], 2, 8, torch.float32, "cpu")
        for slot in (1, 2):
            layer.load_slot(
                slot,
                {"q": (torch.randn(4, 12), torch.randn(4, 6), 0.5), "v": (torch.randn(4, 12), torch.randn(4, 6), 2.0)},
            )
        out[f"l{i}"] = layer
    return out


LAYER_BYTES = 18 * 12 * 4  # one dense fp32 copy


def test_a_sliced_build_switches_in_only_when_every_layer_is_built():
    ls = layers(3)
    fm = FoldManager(ls, "pinned", window=4, budget=1 << 20, slice_bytes=LAYER_BYTES)
    fm.pin("a")
    # one layer per step: the first two steps run unfolded, the third switches in
    assert [fm.update({"a": 1}, remaining_steps=10) for _ in range(3)] == [None, None, 1]
    assert fm.folded_id == "a" and fm.stats.folds == 1 and fm.building is None
    x = torch.randn(5, 12)
    step = build_lora_step([1] * 5, 1, "cpu", torch.float32, fold_slot=1)
    plain = build_lora_step([1] * 5, 1, "cpu", torch.float32)
    for layer in ls.values():
        assert torch.equal(layer.folded_weight, layer.dense_weight(1))
        torch.testing.assert_close(layer(x, step), layer(x, plain))


def test_a_fold_that_cannot_pay_for_its_build_is_not_started():
    ls = layers(3)
    fm = FoldManager(ls, "auto", window=2, budget=1 << 20, slice_bytes=LAYER_BYTES)
    # auto: the streak reaches the window at the 2nd step; 3 slices + window 2 need 5 steps left
    assert fm.update({"a": 1}, remaining_steps=9) is None
    assert fm.update({"a": 1}, remaining_steps=4) is None
    assert fm.building is None and fm.stats.unpaid == 1
    assert fm.update({"a": 1}, remaining_steps=5) is None  # long enough: the build starts
    assert fm.building is not None
    assert fm.update({"a": 1}, remaining_steps=4) is None
    assert fm.update({"a": 1}, remaining_steps=3) == 1
    assert fm.pays(3 * LAYER_BYTES, 3, pinned=True) and not fm.pays(3 * LAYER_BYTES, 2, pinned=True)


def test_a_candidate_that_cannot_pay_keeps_the_current_fold():
    ls = layers(3)
    fm = FoldManager(ls, "auto", window=2, budget=1 << 20, slice_bytes=LAYER_BYTES)
    fm.fold("a", 1)
    # "b" owns the batch for the window, but one step left cannot pay for its 3 slices:
    # "a"'s dense copies must survive (dropping them would cost a's next request a rebuild)
    assert [fm.update({"b": 2}, remaining_steps=1) for _ in range(3)] == [None, None, None]
    assert fm.folded_id == "a" and fm.stats.unfolds == 0 and fm.stats.unpaid >= 1
    assert all(layer.folded_slot == 1 for layer in ls.values())
    assert fm.update({"a": 1}, remaining_steps=1) == 1


@pytest.mark.parametrize("interrupt", ["other traffic", "slot change", "unpin"])
def test_an_interrupted_build_leaves_no_dense_copy_behind(interrupt):
    ls = layers(3)
    pinned = interrupt == "unpin"
    fm = FoldManager(ls, "pinned" if pinned else "auto", window=1, budget=1 << 20, slice_bytes=LAYER_BYTES)
    if pinned:
        fm.pin("a")
    assert fm.update({"a": 1}, remaining_steps=10) is None
    assert sum(layer.folded_weight is not None for layer in ls.values()) == 1
    if interrupt == "other traffic":
        assert fm.update({"a": 1, "b": 2}, remaining_steps=10) is None
    elif interrupt == "slot change":
        fm.on_slot_change(1)
    else:
        fm.unpin("a")
    assert fm.building is None and fm.folded_id is None and fm.stats.abandoned == 1
    assert all(layer.folded_weight is None and layer.folded_slot is None for layer in ls.values())


def test_one_request_at_a_time_over_rotating_adapters_never_folds(tiny_base_dir, tmp_path):
    """Each request's own work is shorter than the window plus its build: fold stays out of the way."""
    refs = [make_adapter(tmp_path / f"a{i}", tiny_base_dir, 4, seed=i) for i in range(3)]
    plain = tiny_engine(tiny_base_dir, fold="off")
    folding = tiny_engine(tiny_base_dir, fold="auto", fold_window=8)
    for i in range(6):
        ref, prompt = refs[i % 3], PROMPTS[i % len(PROMPTS)]
        assert folding.generate([prompt], [ref], GREEDY) == plain.generate([prompt], [ref], GREEDY)
    assert folding.fold.stats.folds == 0 and folding.fold.stats.unpaid > 0
    # the same adapter with enough work left does fold
    folding.generate([PROMPTS[0]], [refs[0]], replace(GREEDY, max_tokens=24))
    assert folding.fold.stats.folds == 1


@pytest.mark.parametrize(
    "slots",
    [
        [4, 1, 0, 4, 4],  # non-contiguous active slots (gathered), uneven, a base token
        [3, 0, 0, 0],  # one adapter next to base tokens: grouped, not the single path
        [2, 1, 2, 1, 2, 1],  # interleaved rows, even groups, no base token
    ],
)
def test_grouped_lora_gathers_each_token_back_from_its_own_group(slots):
    layer, mods = make_layer()
    x = torch.randn(len(slots), 12)
    got = layer(x, build_lora_step(slots, 1, "cpu", torch.float32))
    want = layer.base(x)
    for i, s in enumerate(slots):
        if s:
            want[i] += delta(mods[s], x[i])
    torch.testing.assert_close(got, want)
    for i, s in enumerate(slots):
        if not s:
            assert torch.equal(got[i], layer.base(x)[i])  # base rows: exactly the base


def test_a_step_with_too_few_rows_runs_unfolded_and_keeps_the_fold():
    """min_rows (NF4 on a CPU: the NF4 kernel beats the dense copy on small batches): a smaller
    step neither starts nor advances a build and runs unfolded; a built fold waits for a bigger
    batch instead of being dropped."""
    ls = layers(2)
    fm = FoldManager(ls, "pinned", window=4, budget=1 << 20, slice_bytes=LAYER_BYTES, min_rows=4)
    fm.pin("a")
    assert fm.update({"a": 1}, remaining_steps=10, rows=3) is None
    assert fm.building is None and fm.stats.folds == 0  # not started
    assert [fm.update({"a": 1}, remaining_steps=10, rows=4) for _ in range(2)] == [None, 1]
    assert fm.update({"a": 1}, remaining_steps=10, rows=1) is None  # too small: unfolded
    assert fm.folded_id == "a" and fm.stats.unfolds == 0  # ... but still folded
    assert fm.update({"a": 1}, remaining_steps=10, rows=16) == 1


def test_nf4_on_a_cpu_folds_only_from_the_measured_rows():
    from server.engine import fused
    from server.engine.fold import NF4_AMX_FOLD_MIN_ROWS, NF4_FOLD_MIN_ROWS, fold_min_rows

    cpu = torch.device("cpu")
    assert fold_min_rows("none", cpu, torch.float32) == 1
    # bf16 activations: the AMX kernel where it runs, else bitsandbytes (which any fold beats)
    assert fold_min_rows("nf4", cpu, torch.bfloat16) == (NF4_AMX_FOLD_MIN_ROWS if fused.amx_available() else 1)
    assert fold_min_rows("nf4", torch.device("cuda"), torch.float32) == 1
    expected = NF4_FOLD_MIN_ROWS if fused.tile_kernels_available() else 1
    assert fold_min_rows("nf4", cpu, torch.float32) == expected

"""Numeric bounds: the Gram-matrix update norm against the dense product, the base weight norms
against the model's own weights, and the defaults against adapters that must pass.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapters import base_norms
from adapters.base import BaseInfo
from adapters.bounds import AdapterBounds, check_bounds, delta_norm, measure
from adapters.errors import AdapterOutOfRange
from adapters.format import LoraModule, write_peft
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_delta_norm_equals_the_dense_product_norm(dtype):
    generator = torch.Generator().manual_seed(0)
    for rank, out_f, in_f, scaling in ((1, 7, 5, 3.0), (8, 64, 96, -0.5), (16, 40, 300, 1e-3)):
        A = torch.randn(rank, in_f, generator=generator).to(dtype)
        B = torch.randn(out_f, rank, generator=generator).to(dtype)
        module = LoraModule(A, B, scaling)
        dense = torch.linalg.matrix_norm(scaling * (B.double() @ A.double())).item()
        assert delta_norm(module) == pytest.approx(dense, rel=1e-9)


def test_delta_norm_stays_finite_where_float32_would_overflow():
    A = torch.full((4, 64), 1e4)
    B = torch.full((64, 4), 1e4)
    assert math.isinf(torch.linalg.matrix_norm(1e30 * (B @ A)).item())  # float32 overflows
    assert delta_norm(LoraModule(A, B, 1e30)) == pytest.approx(1e30 * 1e8 * 4 * 64, rel=1e-12)


def test_base_weight_norms_match_the_model_and_are_cached_by_fingerprint(tiny_base_dir, base, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    norms = base.weight_norms()
    assert set(norms) == set(base.all_module_paths())
    for path, norm in norms.items():
        weight = model.get_submodule(path).weight.detach().double()
        assert norm == pytest.approx(torch.linalg.matrix_norm(weight).item(), rel=1e-12)
    cached = json.loads((tiny_base_dir / base_norms.NORMS_FILE).read_text())
    assert cached["fingerprint"] == base.fingerprint
    # a fresh BaseInfo reads the cache instead of the weights
    monkeypatch.setattr(base_norms, "_measure", lambda *a: pytest.fail("weights read again"))
    assert BaseInfo.from_dir(tiny_base_dir).weight_norms() == norms


def test_a_stale_cache_is_measured_again(tiny_base_dir, base, tmp_path):
    stale = {"fingerprint": "0" * 64, "norms": {path: 1.0 for path in base.all_module_paths()}}
    (tiny_base_dir / base_norms.NORMS_FILE).write_text(json.dumps(stale))
    fresh = base_norms.read_weight_norms(tiny_base_dir, base.all_module_paths(), base.fingerprint)
    assert fresh == base.weight_norms() and 1.0 not in fresh.values()


@pytest.mark.parametrize("setting", ["max_scaling", "max_abs_value", "max_delta_ratio"])
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "8"])
def test_bounds_refuse_values_that_name_the_setting(setting, value):
    with pytest.raises(ValueError, match=setting):
        AdapterBounds(**{setting: value})


def test_peft_initialised_adapters_with_large_alpha_pass_the_defaults(tiny_base_dir, base, tmp_path):
    """PEFT starts B at zero, so a fresh adapter's update is zero whatever its alpha."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, config in {
        "alpha_1024_r1": LoraConfig(r=1, lora_alpha=1024, target_modules=["q_proj", "down_proj"]),
        "rslora_8192_r64": LoraConfig(r=64, lora_alpha=8192, use_rslora=True, target_modules=["v_proj"]),
        "patterns": LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 2048},
        ),
    }.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir), config)
        model.save_pretrained(tmp_path / name)
        validated = validate_adapter_dir(tmp_path / name, base)
        figures = measure(validated.weights, base.weight_norms())
        assert max(f["scaling"] for f in figures.values()) == 1024
        assert all(f["delta_ratio"] == 0 for f in figures.values())


def test_random_test_adapters_sit_inside_the_defaults_with_margin(base):
    """The adapters the tests build (A ~ N(0, 1/in), B ~ N(0, 1/r), alpha 2r) must pass: about 3."""
    figures = measure(make_weights(base, rank=8, alpha=16), base.weight_norms())
    ratios = [f["delta_ratio"] for f in figures.values()]
    assert 1 < max(ratios) < AdapterBounds().max_delta_ratio / 2


def test_check_bounds_names_the_first_module_and_the_figures(base):
    weights = make_weights(base, rank=4)
    path = "model.layers.1.self_attn.q_proj"
    weights.modules[path].B.mul_(50)
    ratio = measure(weights, base.weight_norms())[path]["delta_ratio"]
    with pytest.raises(AdapterOutOfRange) as caught:
        check_bounds(weights, base.weight_norms(), AdapterBounds())
    assert caught.value.message == f"{path}: ||scaling*B@A||/||W|| = {ratio:.2g} exceeds 8"
    assert (caught.value.status, caught.value.code) == (422, "adapter_out_of_range")
    # without a base norm for the module, only scaling and magnitudes are checked
    check_bounds(weights, {}, AdapterBounds())
    # a zero base weight admits no update at all
    with pytest.raises(AdapterOutOfRange, match="= inf exceeds"):
        check_bounds(weights, {p: 0.0 for p in weights.modules}, AdapterBounds())


def test_the_written_file_is_what_is_bounded(base, tmp_path):
    """bf16 on disk: the bounds see the stored values, not a float32 copy made before saving."""
    weights = make_weights(base, rank=4, dtype=torch.bfloat16)
    validated = validate_adapter_dir(write_peft(weights, tmp_path / "bf16"), base)
    assert all(m.A.dtype == torch.bfloat16 for m in validated.weights.modules.values())

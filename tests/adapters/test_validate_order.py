"""Validation is cheap first: structural defects are refused before any tensor is loaded, an
over-long tensor list before its JSON is parsed, and each pattern is compiled once.

Timing is asserted by counting work (calls into the instrumented readers), never by clocks.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters.format as format_module
import adapters.safetensors_header as header_module
import adapters.validate as validate_module
from adapters.base import BaseInfo
from adapters.errors import InvalidAdapter
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, write_peft
from adapters.validate import StructuralCaps, validate_adapter_dir
from tests.adapters.helpers import entry, make_weights, raw_safetensors

Q0 = "model.layers.0.self_attn.q_proj"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


@pytest.fixture
def good_dir(base, tmp_path):
    return write_peft(make_weights(base, rank=4, seed=3), tmp_path / "upload")


@pytest.fixture
def loads(monkeypatch):
    """Counts of tensor loads and header JSON parses during validation."""
    counts = {"tensors": 0, "header_json": 0}
    real_load, real_json = validate_module.load_safetensors, header_module.loads_strict

    def load(data):
        counts["tensors"] += 1
        return real_load(data)

    def parse(data):
        counts["header_json"] += 1
        return real_json(data)

    monkeypatch.setattr(validate_module, "load_safetensors", load)
    monkeypatch.setattr(header_module, "loads_strict", parse)
    return counts


def _edit_tensors(directory, mutate):
    state = load_file(str(directory / WEIGHTS_FILE))
    mutate(state)
    save_file(state, str(directory / WEIGHTS_FILE))


def _key(path, which):
    return f"{PREFIX}{path}.lora_{which}.weight"


STRUCTURAL = {
    "shape_mismatch": lambda s: s.__setitem__(_key(Q0, "A"), torch.ones(4, 65)),
    "unexpected_tensor": lambda s: s.pop(_key(Q0, "B")),
    "untargeted_module": lambda s: s.update(
        {
            _key("model.layers.0.self_attn.k_proj", "A"): torch.ones(4, 64),
            _key("model.layers.0.self_attn.k_proj", "B"): torch.ones(32, 4),
        }
    ),
    "layer_out_of_range": lambda s: s.update(
        {
            _key("model.layers.9.self_attn.q_proj", "A"): torch.ones(4, 64),
            _key("model.layers.9.self_attn.q_proj", "B"): torch.ones(64, 4),
        }
    ),
    "unsupported_dtype": lambda s: s.__setitem__(_key(Q0, "A"), torch.ones(4, 64, dtype=torch.float64)),
    "malformed_safetensors": lambda s: s.__setitem__(_key(Q0, "A"), torch.ones(4)),
}


def test_a_good_adapter_loads_its_tensors_once(good_dir, base, loads):
    validate_adapter_dir(good_dir, base)
    assert loads == {"tensors": 1, "header_json": 1}


@pytest.mark.parametrize("code", sorted(STRUCTURAL))
def test_structural_defects_are_refused_before_any_tensor_is_loaded(code, good_dir, base, loads):
    _edit_tensors(good_dir, STRUCTURAL[code])
    with pytest.raises(InvalidAdapter) as caught:
        validate_adapter_dir(good_dir, base)
    assert caught.value.code == code
    assert loads["tensors"] == 0


def test_a_long_tensor_list_is_refused_from_a_byte_scan_before_json(good_dir, base, loads):
    caps = StructuralCaps.for_base(base)
    count = caps.max_tensors + 1
    header = {f"t{i}": entry("F32", [1, 1], 4 * i, 4 * i + 4) for i in range(count)}
    (good_dir / WEIGHTS_FILE).write_bytes(raw_safetensors(header, bytes(4 * count)))
    with pytest.raises(InvalidAdapter) as caught:
        validate_adapter_dir(good_dir, base)
    assert (caught.value.code, caught.value.status) == ("too_many_tensors", 413)
    assert loads == {"tensors": 0, "header_json": 0}


def test_caps_follow_the_base(base, default_base_dir):
    tiny = StructuralCaps.for_base(base)
    assert (tiny.max_tensors, tiny.max_entries) == (2 * 14 + 16, 14 + 7 + 2)
    real = StructuralCaps.for_base(BaseInfo.from_dir(default_base_dir, with_fingerprint=False))
    assert (real.max_tensors, real.max_entries) == (2 * 210 + 16, 210 + 7 + 30)


def test_too_many_config_entries_are_refused_before_tensors(good_dir, base, loads):
    config = json.loads((good_dir / CONFIG_FILE).read_text())
    config["alpha_pattern"] = {f"m{i}": 1.0 for i in range(70_000)}
    (good_dir / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(InvalidAdapter) as caught:
        validate_adapter_dir(good_dir, base)
    assert caught.value.code == "too_many_entries"
    assert loads == {"tensors": 0, "header_json": 0}


def test_each_pattern_is_compiled_once_per_validation(good_dir, base, monkeypatch):
    """Patterns are matched against every module; compiling per lookup would cost keys x modules."""
    config = json.loads((good_dir / CONFIG_FILE).read_text())
    keys = [f"layers.{layer}.mlp.gate_proj" for layer in range(2)] + [f"nothing{i}" for i in range(19)]
    config["rank_pattern"] = {key: 4 for key in keys}
    config["alpha_pattern"] = {key: 8.0 for key in keys}
    (good_dir / CONFIG_FILE).write_text(json.dumps(config))
    compiled = []
    real_compile = re.compile

    def counting(pattern, *args):
        compiled.append(pattern)
        return real_compile(pattern, *args)

    monkeypatch.setattr(format_module.re, "compile", counting)
    validate_adapter_dir(good_dir, base)
    per_key = [compiled.count(rf"(.*\.)?({key})$") for key in keys]
    # one Patterns for rank_pattern (shape check) + one for alpha_pattern (scaling) per validation
    assert min(per_key) >= 1 and max(per_key) <= 2, per_key

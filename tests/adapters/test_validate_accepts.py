"""What validation accepts, and that the content sha256 ignores serialization details."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.base import BaseInfo
from adapters.errors import InvalidAdapter
from adapters.format import CONFIG_FILE, WEIGHTS_FILE, write_peft
from adapters.safetensors_header import parse_header
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


def test_sha256_ignores_key_order_metadata_and_json_layout(base, tmp_path):
    weights = make_weights(base, seed=11)
    first = validate_adapter_dir(write_peft(weights, tmp_path / "a"), base)
    other = write_peft(weights, tmp_path / "b")
    config = json.loads((other / CONFIG_FILE).read_text())
    (other / CONFIG_FILE).write_text(json.dumps(dict(reversed(list(config.items())))))  # no indent, other order
    state = load_file(str(other / WEIGHTS_FILE))
    save_file(dict(reversed(list(state.items()))), str(other / WEIGHTS_FILE), metadata={"format": "pt", "by": "me"})
    assert (other / WEIGHTS_FILE).read_bytes() != (tmp_path / "a" / WEIGHTS_FILE).read_bytes()
    assert validate_adapter_dir(other, base).sha256 == first.sha256


def test_sha256_changes_with_any_weight_bit(base, tmp_path):
    weights = make_weights(base, seed=12)
    first = validate_adapter_dir(write_peft(weights, tmp_path / "a"), base)
    module = weights.modules["model.layers.1.mlp.down_proj"]
    module.B[3, 1] = torch.nextafter(module.B[3, 1], torch.tensor(1.0))
    assert validate_adapter_dir(write_peft(weights, tmp_path / "b"), base).sha256 != first.sha256


def test_layers_to_transform_and_exclude_modules_are_honoured(base, tmp_path):
    weights = make_weights(base, targets=("q_proj",), layers=(1,))
    weights.config["layers_to_transform"] = [1]
    validate_adapter_dir(write_peft(weights, tmp_path / "layer1"), base)

    weights.config["layers_to_transform"] = [0]  # now the layer-1 tensors are not targeted
    with pytest.raises(InvalidAdapter, match="target_modules does not cover"):
        validate_adapter_dir(write_peft(weights, tmp_path / "layer0"), base)

    weights = make_weights(base, targets=("q_proj",), layers=(0,))
    weights.config["exclude_modules"] = ["model.layers.1.self_attn.q_proj"]
    validate_adapter_dir(write_peft(weights, tmp_path / "excluded"), base)


def test_targets_may_be_full_paths_and_tensors_may_be_a_subset(base, tmp_path):
    # PEFT leaves targeted modules without saved tensors at their zero-initialised B.
    weights = make_weights(base, targets=("q_proj", "v_proj"), layers=(0,))
    weights.config["target_modules"] = ["model.layers.0.self_attn.q_proj", "v_proj"]
    validated = validate_adapter_dir(write_peft(weights, tmp_path / "subset"), base)
    assert sorted(validated.weights.modules) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def test_header_parser_agrees_with_safetensors(base, tmp_path):
    weights = make_weights(base, dtype=torch.float16, seed=4)
    data = (write_peft(weights, tmp_path / "x") / WEIGHTS_FILE).read_bytes()
    infos = parse_header(data)
    loaded = load_file(str(tmp_path / "x" / WEIGHTS_FILE))
    assert {i.name for i in infos} == set(loaded)
    for info in infos:
        tensor = loaded[info.name]
        assert info.dtype == "F16" and info.shape == tuple(tensor.shape)
        assert data[info.begin : info.end] == tensor.contiguous().view(torch.uint8).numpy().tobytes()
    assert infos[-1].end == len(data)


def test_real_base_adapter_fits_it_and_not_the_tiny_base(default_base_dir, base, tmp_path):
    real = BaseInfo.from_dir(default_base_dir, with_fingerprint=False)
    assert (real.num_layers, real.linear_shapes["k_proj"]) == (30, (576, 192))
    weights = make_weights(real, rank=8, targets=tuple(real.linear_shapes), seed=5)
    directory = write_peft(weights, tmp_path / "smol")
    assert len(validate_adapter_dir(directory, real).weights.modules) == 30 * 7
    with pytest.raises(InvalidAdapter) as caught:
        validate_adapter_dir(directory, base)
    # 420 tensors are more than a 2-layer base can have: refused from the count, before shapes
    assert caught.value.code == "too_many_tensors" and "more than 44 tensors" in caught.value.message
    two_layers = write_peft(
        make_weights(real, rank=8, targets=tuple(real.linear_shapes), layers=(0, 1)), tmp_path / "2"
    )
    with pytest.raises(InvalidAdapter) as caught:
        validate_adapter_dir(two_layers, base)
    assert caught.value.code == "shape_mismatch" and "needs lora_A [8, 128]" in caught.value.message

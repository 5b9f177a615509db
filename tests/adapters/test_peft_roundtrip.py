"""PEFT <-> loraswap, both ways, on the tiny base: identical deltas and identical logits.

Reference: PEFT itself (`get_delta_weight`, `PeftModel.from_pretrained`) and the hand-applied
update `W + scaling * B @ A`, covering plain LoRA, rsLoRA, rank_pattern and alpha_pattern.
"""

from __future__ import annotations

import pytest
import torch

from adapters.base import BaseInfo
from adapters.format import read_peft, write_peft
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights

peft = pytest.importorskip("peft")
PROMPT = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 2, 1, 50]])
# Pattern keys both ways: a full module path and a bare projection name.
RANK_PATTERN = {"model.layers.1.self_attn.q_proj": 2, "down_proj": 6}
ALPHA_PATTERN = {"v_proj": 3}


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


def load_model(tiny_base_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_peft_written_adapter_reads_with_identical_deltas(tiny_base_dir, base, tmp_path, use_rslora):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(1)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_rslora=use_rslora,
        rank_pattern=RANK_PATTERN,
        alpha_pattern=ALPHA_PATTERN,
    )
    model = get_peft_model(load_model(tiny_base_dir), config)
    expected = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_()  # PEFT initialises B to zero
                expected[name.removeprefix("base_model.model.")] = module.get_delta_weight("default")
    model.save_pretrained(tmp_path / "peft")

    validated = validate_adapter_dir(tmp_path / "peft", base)  # PEFT also wrote README.md
    ours = read_peft(tmp_path / "peft")
    assert set(ours.modules) == set(expected) and len(expected) == 3 * base.num_layers
    assert ours.modules["model.layers.1.self_attn.q_proj"].rank == 2
    assert ours.modules["model.layers.0.mlp.down_proj"].rank == 6
    for path, delta in expected.items():
        assert torch.count_nonzero(delta) > 0
        torch.testing.assert_close(ours.modules[path].delta(), delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(validated.weights.modules[path].delta(), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_adapter_we_write_loads_in_peft_with_identical_logits(tiny_base_dir, base, tmp_path, use_rslora):
    from peft import PeftModel

    weights = make_weights(
        base, rank=4, alpha=8, use_rslora=use_rslora, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
    )
    write_peft(weights, tmp_path / "ours")
    validate_adapter_dir(tmp_path / "ours", base)

    peft_model = PeftModel.from_pretrained(load_model(tiny_base_dir), tmp_path / "ours").eval()
    by_hand = load_model(tiny_base_dir)
    with torch.no_grad():
        base_logits = by_hand(PROMPT).logits
        for path, module in weights.modules.items():
            by_hand.get_submodule(path).weight += module.delta()  # (out, in)
        expected = by_hand(PROMPT).logits
        got = peft_model(PROMPT).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_half_precision_adapter_round_trips_exactly(base, tmp_path):
    weights = make_weights(base, dtype=torch.bfloat16, seed=3)
    write_peft(weights, tmp_path / "bf16")
    again = validate_adapter_dir(tmp_path / "bf16", base).weights
    for path, module in weights.modules.items():
        assert again.modules[path].A.dtype == torch.bfloat16
        assert torch.equal(again.modules[path].A, module.A) and torch.equal(again.modules[path].B, module.B)
        assert again.modules[path].scaling == module.scaling

"""Our LoRA wrapper: PEFT's init and formula, shared dropout masks, config checks, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.format import read_peft, write_peft
from trainer.lora import (
    LoraConfigError,
    LoraLinear,
    LoraSpec,
    SharedDropout,
    export_lora,
    inject_lora,
    parse_target_modules,
)


def test_fresh_wrapper_is_the_base_and_trained_one_follows_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    for spec in (LoraSpec(rank=4, alpha=8, dropout=0.0), LoraSpec(rank=4, alpha=8, dropout=0.0, use_rslora=True)):
        wrapper = LoraLinear(base, 12, 10, spec)
        x = torch.randn(3, 5, 12)
        torch.testing.assert_close(wrapper(x), base(x))  # B starts at zero
        nn.init.normal_(wrapper.lora_B)
        scaling = 8 / 2.0 if spec.use_rslora else 8 / 4
        expected = base(x) + scaling * (x @ wrapper.lora_A.t() @ wrapper.lora_B.t())
        torch.testing.assert_close(wrapper(x), expected)


def test_siblings_reading_one_input_share_a_dropout_mask_only_in_training():
    dropout = SharedDropout(0.5)
    x, y = torch.ones(4, 64), torch.ones(4, 64)
    first, again, other = dropout(x), dropout(x), dropout(y)
    assert again is first  # the same live input -> the same mask
    assert other is not first and not torch.equal(other, first)
    assert set(first.unique().tolist()) <= {0.0, 2.0}
    dropout.eval()
    assert dropout(x) is x


def test_inject_wraps_targets_groups_dropout_and_freezes_base(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    from adapters.base import BaseInfo

    info = BaseInfo.from_dir(tiny_base_dir, with_fingerprint=False)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32)
    spec = LoraSpec(rank=2, alpha=4, dropout=0.1, target_modules=("q_proj", "v_proj", "o_proj", "up_proj"))
    wrappers = inject_lora(model, spec, info.linear_shapes)
    assert list(wrappers) == [
        f"model.layers.{i}.{g}.{p}"
        for i in range(2)
        for g, p in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"), ("mlp", "up_proj"))
    ]
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.dropout is layer.self_attn.v_proj.dropout
    assert layer.self_attn.o_proj.dropout is not layer.self_attn.q_proj.dropout
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{path}.lora_{w}" for path in wrappers for w in "AB"}

    weights = export_lora(wrappers, spec, base_name="tiny")
    directory = write_peft(weights, tiny_base_dir.parent / "exported")
    back = read_peft(directory)
    assert back.config["r"] == 2 and back.config["lora_alpha"] == 4
    assert back.config["target_modules"] == sorted(spec.target_modules)
    for path, module in back.modules.items():
        torch.testing.assert_close(module.A, wrappers[path].lora_A.detach())
        assert module.scaling == pytest.approx(2.0)


def test_target_module_parsing_and_spec_checks():
    assert parse_target_modules("all-linear")[0] == "q_proj" and len(parse_target_modules("all-linear")) == 7
    assert parse_target_modules("q_proj, v_proj,q_proj") == ("q_proj", "v_proj")
    with pytest.raises(LoraConfigError, match="lm_head"):
        parse_target_modules("q_proj,lm_head")
    with pytest.raises(LoraConfigError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(LoraConfigError, match="dropout"):
        LoraSpec(dropout=1.0)

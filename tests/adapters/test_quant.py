"""`adapters.quant`: the one NF4 construction (trainer and engine) and the dtype names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapters.quant import DTYPES, NF4_BLOCKSIZE, nf4_linear, parse_dtype


def test_nf4_linear_quantizes_like_bitsandbytes_reference():
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight, bias = torch.randn(24, 64), torch.randn(24)
    layer = nf4_linear(weight, bias, torch.float32, "cpu")
    state = layer.weight.quant_state
    assert (state.quant_type, state.blocksize, layer.weight.requires_grad) == ("nf4", NF4_BLOCKSIZE, False)
    packed, ref_state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    want = bnbf.dequantize_4bit(packed, ref_state)
    got = bnbf.dequantize_4bit(layer.weight.data, state)
    assert torch.equal(got, want)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ want.t() + bias, atol=1e-4)


def test_trainer_and_engine_build_the_same_nf4_layer():
    from server.engine.loader import _make_base_linear
    from trainer.model import quantize_nf4

    torch.manual_seed(1)
    dense = nn.Linear(64, 24, bias=False)
    holder = nn.Module()
    holder.self_attn, holder.mlp = nn.Module(), nn.Module()
    holder.self_attn.q_proj = nn.Linear(64, 24, bias=False)
    holder.self_attn.q_proj.weight.data.copy_(dense.weight.data)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([holder])

        def get_decoder(self):
            return self

    assert quantize_nf4(Decoder()) == 1
    trained = holder.self_attn.q_proj
    served = _make_base_linear(dense.weight.data, None, "nf4", torch.float32, torch.device("cpu"))
    assert torch.equal(trained.weight.data, served.nf4_source[0])


@pytest.mark.parametrize(
    "name, dtype",
    [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float32", torch.float32), ("fp16", torch.float16)],
)
def test_dtype_names(name, dtype):
    assert parse_dtype(name) == dtype


def test_unknown_or_disallowed_dtype_names_the_setting():
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="dtype"):
        parse_dtype("float16", allowed=("float32", "bfloat16"))
    assert set(DTYPES) == {"float32", "bfloat16", "float16"}

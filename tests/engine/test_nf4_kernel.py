"""The NF4 kernel (`fused.nf4_linear`) and the engine's NF4 projection (`nf4.NF4Linear`) against
bitsandbytes: the same packed nibbles and scales, dequantized by bitsandbytes, multiplied in
float64; and bitsandbytes' own layer wherever the kernel does not run."""

from __future__ import annotations

import pytest
import torch

from adapters.quant import nf4_linear
from server.engine import fused
from server.engine.nf4 import NF4Linear
from tests.engine.helpers import assert_poison_stays_in_its_row

pytestmark = pytest.mark.skipif(not fused.enabled(), reason="native kernels unavailable")


def _layer(out_features: int, in_features: int, seed: int = 0, bias: bool = False):
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features) * 0.05
    b = torch.randn(out_features) if bias else None
    return nf4_linear(weight, b, torch.float32, "cpu").eval()


def _exact(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T in float64, W dequantized by bitsandbytes from the layer's own packed data."""
    import bitsandbytes.functional as bnbf

    data, state = layer.nf4_source
    weight = bnbf.dequantize_4bit(data, state).double()
    y = x.double() @ weight.t()
    return y if layer.bias is None else y + layer.bias.double()


def _kernel_served(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    data, state = layer.nf4_source
    y = fused.nf4_linear(x, data, layer._absmax, layer._code, layer.out_features, state.blocksize)
    assert y is not None, "the kernel declined a layout it covers"
    return y


@pytest.mark.parametrize("out_features,in_features", [(64, 64), (130, 64), (96, 128), (384, 576)])
@pytest.mark.parametrize("rows", [1, 3, 4, 17, 130])  # 130: past one call's 128 rows
def test_kernel_equals_the_dequantized_product(out_features, in_features, rows):
    layer = NF4Linear(_layer(out_features, in_features))
    x = torch.randn(rows, in_features)
    exact = _exact(layer, x)
    got = _kernel_served(layer, x)
    error = ((got.double() - exact).abs().max() / exact.abs().max()).item()
    assert error < 2e-6, error  # float32 accumulation of exactly decoded weights


def test_kernel_reads_strided_rows():
    layer = NF4Linear(_layer(64, 128))
    wide = torch.randn(5, 200)
    x = wide[:, 40:168]  # rows 200 floats apart
    torch.testing.assert_close(_kernel_served(layer, x), _kernel_served(layer, x.contiguous()), rtol=0, atol=0)


def test_layer_uses_the_kernel_and_adds_the_bias():
    layer = NF4Linear(_layer(96, 64, bias=True))
    x = torch.randn(6, 64)
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got.double(), _exact(layer, x), rtol=0, atol=1e-5)
    assert not getattr(layer.layer.weight.quant_state, "packing_format_for_cpu", False)  # bitsandbytes never ran


def test_layer_falls_back_to_bitsandbytes_exactly(eager):
    torch.manual_seed(1)
    x = torch.randn(4, 64)
    reference = _layer(96, 64, seed=3)
    with torch.inference_mode():
        expected = reference(x)  # bitsandbytes alone
        with eager:
            got = NF4Linear(_layer(96, 64, seed=3))(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_kernel_and_bitsandbytes_agree_to_bitsandbytes_precision():
    """bitsandbytes' CPU kernel rounds input, scales and output to bf16; ours does not: the two
    agree to bf16 precision, and ours is the closer to the exact product."""
    x = torch.randn(16, 576)
    served = NF4Linear(_layer(384, 576, seed=4))
    with torch.inference_mode():
        ours = served(x).double()
        theirs = _layer(384, 576, seed=4)(x).double()
    exact = _exact(served, x)
    scale = exact.abs().max()
    assert ((theirs - exact).abs().max() / scale).item() < 2e-2
    assert (ours - exact).abs().max() <= (theirs - exact).abs().max()


def test_the_kernel_declines_what_it_does_not_cover():
    """bf16 activations, and rows whose 64-weight blocks cross a row (in_features 48): None, so
    the layer runs bitsandbytes."""
    layer = NF4Linear(_layer(64, 64))
    data, state = layer.nf4_source
    bf16 = torch.randn(2, 64, dtype=torch.bfloat16)
    assert fused.nf4_linear(bf16, data, layer._absmax, layer._code, 64, state.blocksize) is None
    crossing = NF4Linear(_layer(32, 48, seed=5))
    data, state = crossing.nf4_source
    x = torch.randn(3, 48)
    assert fused.nf4_linear(x, data, crossing._absmax, crossing._code, 32, state.blocksize) is None


def test_a_repacked_layer_is_refused():
    layer = _layer(64, 64)
    with torch.inference_mode():
        layer(torch.randn(2, 64))  # bitsandbytes repacks here on CPUs with AVX512-BF16
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU")
    with pytest.raises(ValueError, match="repacked"):
        NF4Linear(layer)


@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_a_poisoned_token_row_stays_in_its_row(rows):
    layer = NF4Linear(_layer(96, 128, seed=6))
    assert_poison_stays_in_its_row(lambda x: _kernel_served(layer, x), torch.randn(rows, 128))

"""The NF4 x bf16 kernel on AMX (`fused.nf4_amx_linear`, native/nf4_amx.c) against the exact
product of bitsandbytes' own dequantized weights, and the engine's NF4 + bf16 path against
transformers + bitsandbytes. Skipped where AMX does not run (the layer then keeps bitsandbytes)."""

from __future__ import annotations

import pytest
import torch

from adapters.quant import nf4_linear
from server.engine import fused
from server.engine.nf4 import NF4Linear
from tests.engine.helpers import assert_poison_stays_in_its_row

pytestmark = pytest.mark.skipif(not fused.amx_available(), reason="no AMX-BF16 here (or native kernels off)")


def _layer(out_features: int, in_features: int, seed: int = 0, bias: bool = False) -> NF4Linear:
    torch.manual_seed(seed)
    weight = torch.randn(out_features, in_features) * 0.05
    b = torch.randn(out_features) if bias else None
    return NF4Linear(nf4_linear(weight, b, torch.float32, "cpu").eval())


def _panels(layer: NF4Linear) -> fused.NF4Panels:
    panels = layer.panels()
    assert panels is not None, "a covered shape was not paneled"
    return panels


def _served(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    y = fused.nf4_amx_linear(x, _panels(layer), layer._code)
    assert y is not None, "the kernel declined a layout it covers"
    return y


def _exact(layer: NF4Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T in float64 with W as bitsandbytes dequantizes it, rounded to bf16 (the weights the
    kernel multiplies)."""
    import bitsandbytes.functional as bnbf

    data, state = layer.nf4_source
    weight = bnbf.dequantize_4bit(data, state).to(torch.bfloat16).double()
    return x.double() @ weight.t()


@pytest.mark.parametrize("out_features,in_features", [(16, 64), (48, 64), (96, 128), (384, 576), (64, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40, 70])  # partial, whole, several blocks; >32: decoded once
def test_kernel_equals_the_exact_product_rounded_once(out_features, in_features, rows):
    """48 outputs: an odd number of 16-row panels (the last pair has one)."""
    layer = _layer(out_features, in_features)
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    got = _served(layer, x).double()
    exact = _exact(layer, x)
    once = exact.float().to(torch.bfloat16).double()  # the exact product, rounded to bf16 once
    # float32 sums in the tile unit's order: a value next to a rounding boundary may land one
    # bf16 step away, never further
    step = torch.finfo(torch.bfloat16).eps * once.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((got - once).abs() <= step).all()
    assert (got == once).double().mean() > 0.98


def test_a_row_gets_the_same_bits_alone_and_at_any_position():
    layer = _layer(96, 128, seed=2)
    x = torch.randn(40, 128).to(torch.bfloat16)
    batch = _served(layer, x)
    for row in (0, 15, 16, 39):
        assert torch.equal(_served(layer, x[row : row + 1]), batch[row : row + 1])


def test_kernel_reads_strided_rows():
    layer = _layer(64, 128)
    wide = torch.randn(5, 200).to(torch.bfloat16)
    x = wide[:, 40:168]  # rows 200 values apart
    assert torch.equal(_served(layer, x), _served(layer, x.contiguous()))


@pytest.mark.parametrize("rows", [1, 5, 17])
def test_a_poisoned_token_row_stays_in_its_row(rows):
    layer = _layer(96, 128, seed=6)
    assert_poison_stays_in_its_row(lambda x: _served(layer, x), torch.randn(rows, 128).to(torch.bfloat16))


def test_the_layer_serves_bf16_through_the_kernel_and_adds_the_bias():
    layer = _layer(96, 64, bias=True)
    x = torch.randn(6, 64).to(torch.bfloat16)
    with torch.inference_mode():
        got = layer(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, _served(layer, x).add_(layer.bias))
    assert not getattr(layer.layer.weight.quant_state, "packing_format_for_cpu", False)  # bitsandbytes never ran


def test_what_the_kernel_does_not_cover_keeps_bitsandbytes(eager):
    """Outputs not a multiple of 16 get no panels; float32 activations are not this kernel's;
    with the native kernels off the layer is bitsandbytes' exactly."""
    odd = _layer(40, 64)
    assert odd.panels() is None
    layer = _layer(64, 64)
    assert fused.nf4_amx_linear(torch.randn(2, 64), _panels(layer), layer._code) is None
    x = torch.randn(4, 64).to(torch.bfloat16)
    with torch.inference_mode():
        with eager:
            expected = _layer(64, 64).layer(x)  # bitsandbytes alone, on a fresh copy
            got = _layer(64, 64)(x)
    assert torch.equal(got, expected)


def test_panels_are_the_same_nibbles_rearranged():
    layer = _layer(32, 128, seed=3)
    data, state = layer.nf4_source
    panels = _panels(layer)
    rows = data.reshape(32, 64)  # 64 bytes a row: two weights a byte
    assert torch.equal(panels.data[1, 5], rows[16:32, 5])  # panel 1, column pair 5: rows 16..31
    assert torch.equal(panels.scales[1, 1], layer._absmax.reshape(32, 2)[16:32, 1])
    assert panels.data.numel() == data.numel()


def test_the_engine_in_nf4_bf16_equals_transformers_bitsandbytes(default_base_dir):
    """The whole model: NF4 with bf16 activations, greedy, against transformers + bitsandbytes
    with bf16 compute (bitsandbytes' own kernel, which rounds the scales to bf16 as well)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.types import SamplingParams
    from tests.engine.helpers import hf_greedy
    from tests.engine.test_engine_bases import chat_prompts

    config = EngineConfig(
        base=default_base_dir,
        quant="nf4",
        dtype="bfloat16",
        device="cpu",
        max_model_len=512,
        kv_cache_bytes=64 * 2**20,
        fold="off",
    )
    engine = Engine(config)
    try:
        prompts = chat_prompts(engine.tokenizer)
        got = engine.generate(prompts, sampling=SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        served = [m for m in engine.model.modules() if isinstance(m, NF4Linear)]
        assert served and all(m._panels is not None for m in served), "a projection did not run on AMX"
    finally:
        engine.close()
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(
        str(default_base_dir), dtype=torch.bfloat16, quantization_config=quantized, device_map="cpu"
    ).eval()
    assert got == [hf_greedy(reference, p, 12) for p in prompts]

"""The float32 tile kernel (`fused.dense_linear`) and the engine's dense linear (`packed.linear`,
`packed.DenseLinear`) against the float64 product, against F.linear where the kernel does not run,
and row by row against itself at other batch sizes (the kernel is batch-invariant)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine import fused, packed

pytestmark = pytest.mark.skipif(not fused.tile_kernels_available(), reason="no AVX-512 native kernels")


def _served(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = fused.dense_linear(x, weight, bias)
    assert y is not None, "the kernel declined a layout it covers"
    return y


@pytest.mark.parametrize("out_features,in_features", [(64, 64), (130, 576), (6, 16), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_the_float64_product(out_features, in_features, rows, bias):
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features) * 0.05
    b = torch.randn(out_features) if bias else None
    x = torch.randn(rows, in_features)
    exact = x.double() @ weight.double().t() + (0 if b is None else b.double())
    got = _served(x, weight, b)
    assert got.shape == (rows, out_features)
    error = ((got.double() - exact).abs().max() / exact.abs().max()).item()
    assert error < 2e-6, error


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gets_the_same_bits_at_every_batch_size_and_position(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        weight = torch.randn(259, 576) * 0.05  # 259: a last group of three rows
        x = torch.randn(23, 576)
        whole = _served(x, weight)
        for i in range(x.shape[0]):
            alone = _served(x[i : i + 1], weight)
            assert torch.equal(alone[0], whole[i]), f"row {i} alone differs from row {i} in the batch"
        moved = _served(torch.cat([torch.randn(6, 576), x[5:7]]), weight)  # other company, other tiles
        assert torch.equal(moved[6:], whole[5:7])
    finally:
        torch.set_num_threads(before)


def test_kernel_reads_strided_rows():
    torch.manual_seed(1)
    weight = torch.randn(40, 128)
    wide = torch.randn(5, 200)
    x = wide[:, 40:168]  # rows 200 floats apart
    assert torch.equal(_served(x, weight), _served(x.contiguous(), weight))


def test_a_nan_row_reaches_only_its_own_outputs():
    torch.manual_seed(2)
    weight = torch.randn(36, 64)
    x = torch.randn(8, 64)
    clean = _served(x, weight)
    x[3, 10] = float("nan")
    poisoned = _served(x, weight)
    assert poisoned[3].isnan().all()
    keep = [i for i in range(8) if i != 3]
    assert torch.equal(poisoned[keep], clean[keep])


def test_layouts_the_kernel_declines():
    weight = torch.randn(32, 64)
    assert fused.dense_linear(torch.randn(2, 64, dtype=torch.bfloat16), weight.bfloat16()) is None
    assert fused.dense_linear(torch.randn(2, 24), torch.randn(32, 24)) is None  # in % 16
    assert fused.dense_linear(torch.randn(2, 64), torch.randn(64, 32).t()) is None  # weight not contiguous
    assert fused.dense_linear(torch.randn(64, 2).t(), weight) is None  # columns strided
    assert fused.dense_linear(torch.randn(2, 2, 64), weight) is None


def test_engine_linear_takes_the_kernel_for_decode_batches_and_mkl_beyond():
    torch.manual_seed(3)
    weight, bias = torch.randn(48, 64), torch.randn(48)
    small = torch.randn(packed.DENSE_KERNEL_MAX_ROWS, 64)
    large = torch.randn(packed.DENSE_KERNEL_MAX_ROWS + 1, 64)
    assert torch.equal(packed.linear(small, weight, bias), _served(small, weight, bias))
    assert torch.equal(packed.linear(large, weight, bias), F.linear(large, weight, bias))


def test_kernels_off_take_f_linear(eager):
    torch.manual_seed(4)
    weight, x = torch.randn(48, 64), torch.randn(4, 64)
    with eager:
        assert fused.dense_linear(x, weight) is None
        assert torch.equal(packed.linear(x, weight), F.linear(x, weight))


def test_dense_linear_module_is_an_nn_linear_running_the_engine_linear():
    torch.manual_seed(5)
    layer = packed.DenseLinear(64, 48, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), _served(x, layer.weight, layer.bias))
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)

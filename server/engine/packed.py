"""Dense projections on the CPU: bf16 in oneDNN's prepacked weight layout, float32 decode
batches through our tile kernel.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call;
`torch.ops.mkldnn._reorder_linear_weight` does that once at load, and
`torch.ops.mkldnn._linear_pointwise` then runs the AMX / AVX512-BF16 kernel straight from it
(what inductor's weight freezing emits). Every linear of SmolLM2-135M plus its LM head, interleaved,
best of 8 (`python -m bench.gemm_bench`): batch 1 19.7 -> 13.3 ms, batch 16 21.8 -> 14.3 ms,
against 17.7 / 43.0 ms for fp32 `F.linear`. Results equal `F.linear`'s bit for bit there.

Only bf16: an fp32 prepacked weight ran batch 1 slower than `F.linear` (22.6 against 17.7 ms),
so float32 keeps plain tensors. A packed weight is an opaque mkldnn tensor; `unpack` reorders it
back to the plain (out, in) layout, exactly and in time linear in its size.

float32 `F.linear` (MKL) is slow at decode batch sizes here: every linear of the default base
plus its LM head, weights from memory (`python -m bench.gemm_bench`), takes 47.9 ms at batch 4 and
75.8 ms at batch 16 against 26.4 at batch 1. `fused.dense_linear` (four weight rows read once
against four token rows at a time) takes 27.7 and 42.4 ms, and 26.7 at batch 1; it also gives a
row the same bits whatever the batch. It runs up to `DENSE_KERNEL_MAX_ROWS` rows (a prefill
beyond that keeps MKL, which catches up as the batch grows: 118 against 139 ms at 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import fused

# oneDNN picks the blocked layout for a batch size; 16 served batches 1 to 64 best here.
PACK_FOR_BATCH = 16

# Token rows up to which float32 takes fused.dense_linear (measured above: it wins up to 64).
DENSE_KERNEL_MAX_ROWS = 64


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether dense weights of `dtype` on `device` are kept prepacked."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) dense weight -> the opaque prepacked weight `linear` reads."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_FOR_BATCH)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for a plain or a prepacked weight; x (T, in) -> (T, out)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")
    if x.dtype is torch.float32 and x.dim() == 2 and x.shape[0] <= DENSE_KERNEL_MAX_ROWS:
        y = fused.dense_linear(x, weight, bias)
        if y is not None:
            return y
    return F.linear(x, weight, bias)


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight of a prepacked one (a plain weight is returned as is)."""
    return weight.to_dense() if weight.is_mkldnn else weight


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight lives prepacked; `dense_weight()` gives the plain one."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = pack(weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return unpack(self.packed)


class DenseLinear(nn.Linear):
    """A frozen plain `nn.Linear` (float32 on a CPU, or any dtype elsewhere) whose forward runs
    `linear`: the tile kernel for float32 decode batches, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

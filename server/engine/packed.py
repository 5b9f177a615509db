"""Dense bf16 projections on the CPU in oneDNN's prepacked weight layout.

`F.linear` on a bf16 CPU tensor reorders the weight into oneDNN's blocked layout on every call;
`torch.ops.mkldnn._reorder_linear_weight` does that once at load, and
`torch.ops.mkldnn._linear_pointwise` then runs the AMX / AVX512-BF16 kernel straight from it
(what inductor's weight freezing emits). Every linear of SmolLM2-135M plus its LM head, interleaved,
best of 8 (`python -m bench.gemm_bench`): batch 1 19.7 -> 13.3 ms, batch 16 21.8 -> 14.3 ms,
against 17.7 / 43.0 ms for fp32 `F.linear`. Results equal `F.linear`'s bit for bit there.

Only bf16: an fp32 prepacked weight ran batch 1 slower than `F.linear` (22.6 against 17.7 ms),
so float32 keeps plain tensors. A packed weight is an opaque mkldnn tensor; `unpack` reorders it
back to the plain (out, in) layout, exactly and in time linear in its size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks the blocked layout for a batch size; 16 served batches 1 to 64 best here.
PACK_FOR_BATCH = 16


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

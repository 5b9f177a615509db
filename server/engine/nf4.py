"""The engine's NF4 projection on a CPU: bitsandbytes' `Linear4bit` storage, our kernel.

bitsandbytes' CPU kernel (on CPUs with AVX512-BF16) rounds the input, the block scales and the
output to bf16, and spends most of its time decoding nibbles: 60.5 ms for the default base's 150
projections at batch 16, 20.9 ms at batch 1 (`python -m bench.kernel_bench`). `fused.nf4_linear`
reads the same packed nibbles and float32 scales, decodes four output rows at a time into L1
(straight into the sums at batch 1) and computes in float32 (each weight exactly code * absmax,
as bitsandbytes' own dequantize): 33.9 and 12.1 ms. For bf16 activations on a CPU with AMX,
`fused.nf4_amx_linear` decodes the same weights to bf16 into tiles that the matrix unit
multiplies (native/nf4_amx.c), from a copy of the nibbles rearranged in 16-row panels (built on
the first bf16 call; 4 bits a weight). `NF4Linear` wraps the bitsandbytes layer and runs a kernel
when it can (float32 activations on an AVX-512 CPU, or bf16 on AMX, with the native kernels on),
bitsandbytes otherwise; the quantization itself is bitsandbytes' (`adapters.quant.nf4_linear`)
either way.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from server.engine import fused


class NF4Linear(nn.Module):
    """A frozen bitsandbytes NF4 `Linear4bit` whose forward runs `fused.nf4_linear` when it can.

    `nf4_source` is the packed data and quant state as quantized, before bitsandbytes repacks its
    own copy for its CPU kernel on the first forward: the kernel and `lora.dequantized_weight`
    (fold) read it."""

    def __init__(self, layer: nn.Module):
        """layer: a CPU `Linear4bit` that has not run a forward yet (bitsandbytes' first CPU
        forward repacks its storage into a layout only its own kernel reads)."""
        super().__init__()
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise ValueError("the Linear4bit was already repacked for bitsandbytes' CPU kernel")
        self.layer = layer
        data, state = layer.weight.data.clone(), copy.deepcopy(layer.weight.quant_state)
        self.nf4_source = (data, state)
        self.out_features, self.in_features = state.shape
        self._code = state.code.to(torch.float32).contiguous()
        self._absmax = state.absmax.to(torch.float32).contiguous()
        self._nested = state.nested  # double-quantized scales: the kernel reads plain ones only
        self._panels: fused.NF4Panels | None = None  # built on the first bf16 forward where AMX runs

    @property
    def bias(self) -> torch.Tensor | None:
        return self.layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._nested and x.dim() == 2:
            data, state = self.nf4_source
            if x.dtype is torch.bfloat16:
                panels = self.panels()
                y = None if panels is None else fused.nf4_amx_linear(x, panels, self._code)
            else:
                y = fused.nf4_linear(x, data, self._absmax, self._code, self.out_features, state.blocksize)
            if y is not None:
                return y if self.layer.bias is None else y.add_(self.layer.bias)
        return self.layer(x)

    def panels(self) -> fused.NF4Panels | None:
        """The weight in `nf4_amx_linear`'s layout, built once where AMX runs; None where it does
        not, or for a shape the kernel does not cover."""
        if self._panels is None and fused.amx_available():
            data, state = self.nf4_source
            self._panels = fused.NF4Panels.of(data, self._absmax, self.out_features, self.in_features, state.blocksize)
        return self._panels

"""The base's numerics shared by trainer and server: dtype names and the one NF4 layer construction.

"Train and serve on the same quantization" holds because `trainer.model.quantize_nf4` and the
engine's loader both build their NF4 projections with `nf4_linear`: bitsandbytes `Linear4bit`,
NF4, blocksize 64, no double quantization, uint8 storage, exactly as transformers'
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`. bitsandbytes is imported only
when a layer is built.
"""

from __future__ import annotations

import torch
from torch import nn

NF4_BLOCKSIZE = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_dtype(name: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """`"bfloat16"` (or its short alias `"bf16"`) -> torch.bfloat16; ValueError naming `dtype` otherwise."""
    canonical = _DTYPE_ALIASES.get(name, name)
    if canonical not in allowed:
        names = ", ".join(allowed + tuple(alias for alias, full in _DTYPE_ALIASES.items() if full in allowed))
        raise ValueError(f"dtype must be one of {names}, got {name!r}")
    return DTYPES[canonical]


def nf4_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """A frozen NF4 `Linear4bit` holding `weight` (out, in), quantized on `device`.

    `bias`, when given, is kept dense as passed (the caller picks its dtype).
    """
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        weight.to(compute_dtype).contiguous(),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=False,
        quant_type="nf4",
        quant_storage=torch.uint8,
        module=layer,
    ).to(device)  # bitsandbytes quantizes on the move
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device), requires_grad=False)
    return layer

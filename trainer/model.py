"""The model being trained: the frozen base (fp32 / bf16, or NF4 for QLoRA) plus LoRA wrappers.

QLoRA quantizes every decoder projection to NF4 through bitsandbytes exactly as a server
loading the base with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`
does (blocksize 64, no double quantization, embeddings and lm_head left dense), so the
adapter learns around the same quantization error it will be served with. The LoRA
weights stay in float32. Nothing here knows about data or the optimiser.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters import quant
from adapters.base import LINEAR_MODULES, BaseInfo
from adapters.quant import nf4_linear
from trainer.lora import LoraLinear, LoraSpec, inject_lora, lora_parameters

TRAIN_DTYPES = ("float32", "bfloat16")  # the dense base / compute dtypes training supports


def parse_dtype(name: str) -> torch.dtype:
    """A training dtype name (float32 / bfloat16, or fp32 / bf16) -> the torch dtype."""
    return quant.parse_dtype(name, TRAIN_DTYPES)


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> int:
    """Replace every decoder-layer projection of `model` with a bitsandbytes NF4 `Linear4bit`.

    Returns how many layers were quantized. The quantization happens on the module's current
    device (CPU here; bitsandbytes quantizes on `.to(device)`).
    """
    count = 0
    for layer in model.get_decoder().layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEAR_MODULES:
                linear = getattr(parent, name, None)
                if not isinstance(linear, nn.Linear):
                    continue
                bias = None if linear.bias is None else linear.bias.data.clone()
                setattr(parent, name, nf4_linear(linear.weight.data, bias, compute_dtype, linear.weight.device))
                count += 1
    return count


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to return free heap pages to the OS (no-op elsewhere).

    Freed tensors otherwise stay in the process's heap, and the RSS of a QLoRA run would still
    count the dense weights it no longer holds.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class TrainableModel:
    """The base with LoRA injected: the HF model, its wrappers by module path, and the spec."""

    model: nn.Module
    wrappers: dict[str, LoraLinear]
    spec: LoraSpec
    info: BaseInfo
    qlora: bool

    def trainable_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.wrappers)


def load_trainable(
    base_dir: Path,
    spec: LoraSpec,
    *,
    qlora: bool = False,
    dtype: torch.dtype = torch.float32,
    info: BaseInfo | None = None,
    device: torch.device | str = "cpu",
) -> TrainableModel:
    """Load the base from `base_dir`, optionally quantize it to NF4, freeze it and inject LoRA.

    Args:
        base_dir: a local HF directory (see `adapters.base.resolve_base`).
        spec: LoRA hyperparameters and target modules.
        qlora: quantize the decoder projections to NF4 (compute in `dtype`).
        dtype: the dense base's dtype (float32 or bfloat16).
        info: the base's `BaseInfo`, read from `base_dir` when omitted.
        device: where to train; NF4 quantization happens there (bitsandbytes quantizes on move).
    """
    from transformers import AutoModelForCausalLM

    info = info or BaseInfo.from_dir(Path(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    if qlora:
        quantize_nf4(model, compute_dtype=dtype)
        # The dense tensors left (embeddings, norms) may be views of the memory-mapped checkpoint,
        # which keeps every page of it resident; own copies let the whole mapping go.
        for param in model.parameters():
            if not hasattr(param, "quant_state"):
                param.data = param.data.clone()
        release_freed_memory()
    wrappers = inject_lora(model, spec, info.linear_shapes)
    model.config.use_cache = False
    return TrainableModel(model=model, wrappers=wrappers, spec=spec, info=info, qlora=qlora)

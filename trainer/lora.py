"""Our own small LoRA wrapper for training: inject into a base model, train, export to PEFT.

`LoraLinear` wraps a frozen base projection (an `nn.Linear` or a bitsandbytes `Linear4bit`)
and adds `scaling * B @ A` to its output, with PEFT's initialisation (A kaiming-uniform,
B zeros, so a fresh adapter is exactly the base) and dropout on the LoRA branch only.
`inject_lora` swaps the targeted projections of every decoder layer for wrappers;
`export_lora` turns the trained wrappers into `adapters.format.LoraWeights`, the value
`write_peft` saves. This module knows nothing about data or optimisation.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import LINEAR_MODULES
from adapters.format import LoraModule, LoraWeights, lora_scaling, peft_config


class LoraConfigError(ValueError):
    """A LoRA hyperparameter (rank, alpha, dropout, target modules) is out of range."""


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: rank, alpha, dropout, rsLoRA and the projection names."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LINEAR_MODULES
    use_rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise LoraConfigError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise LoraConfigError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(LINEAR_MODULES))
        if unknown or not self.target_modules:
            raise LoraConfigError(f"target modules {unknown or '[]'} are not among {', '.join(LINEAR_MODULES)}")

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.use_rslora)


def parse_target_modules(value: str) -> tuple[str, ...]:
    """`all-linear` -> every projection; otherwise a comma list such as `q_proj,v_proj`."""
    if value.strip() == "all-linear":
        return LINEAR_MODULES
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    LoraSpec(target_modules=names)  # raises LoraConfigError naming the unknown ones
    return names


class LoraLinear(nn.Module):
    """`base(x) + scaling * B(A(dropout(x)))` with a frozen `base` and trainable A, B.

    Args:
        base: the projection to wrap; its weights are never touched.
        in_features / out_features: the projection's shape (a Linear4bit's packed weight
            does not show it).
        spec: rank, alpha, dropout and rsLoRA.
        dropout: a `SharedDropout` shared with siblings reading the same input (own one if None).
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        out_features: int,
        spec: LoraSpec,
        dropout: "SharedDropout | None" = None,
    ):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.scaling = spec.scaling
        self.dropout = dropout if dropout is not None else SharedDropout(spec.dropout)
        device = next(base.parameters()).device
        # LoRA weights stay float32 whatever the base's dtype (bf16 or NF4).
        self.lora_A = nn.Parameter(torch.empty(spec.rank, in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, spec.rank, device=device))  # (out, r)
        # PEFT's default init: the adapter starts as an exact no-op because B is zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # (..., out)
        lora_in = self.dropout(x).to(self.lora_A.dtype)
        # Scale the rank-r intermediate, not the (..., out) update: same result, out/r times less work.
        hidden = (lora_in @ self.lora_A.t()) * self.scaling  # (..., r)
        if out.dtype != hidden.dtype:
            return out + (hidden @ self.lora_B.t()).to(out.dtype)
        flat = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), self.lora_B.t())
        return flat.view(out.shape)  # fused add: (tokens, out) + (tokens, r) @ (r, out)


class SharedDropout(nn.Module):
    """Dropout whose mask is shared by sibling projections that read the same activation.

    q/k/v read one tensor, and so do gate/up: PEFT draws a mask per module, we draw one per
    input (the same regularisation in expectation, 3 of 7 mask draws saved per layer). Input
    and output are held by weak reference only, so nothing outlives the step that made it and
    a match (`x is last input`) can only be the very same live tensor.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self._last: tuple[weakref.ref, weakref.ref] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self._last is not None and self._last[0]() is x:
            cached = self._last[1]()
            if cached is not None:
                return cached
        out = F.dropout(x, self.p, training=True)
        self._last = (weakref.ref(x), weakref.ref(out))
        return out


# Projections reading the same activation inside a decoder layer (they share a dropout mask).
INPUT_GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def _projection_parent(layer: nn.Module, projection: str) -> nn.Module:
    return layer.self_attn if hasattr(layer.self_attn, projection) else layer.mlp


def inject_lora(model: nn.Module, spec: LoraSpec, shapes: dict[str, tuple[int, int]]) -> dict[str, LoraLinear]:
    """Freeze `model` and wrap the targeted projections of every decoder layer.

    Args:
        model: a Llama-family `*ForCausalLM`.
        spec: the LoRA hyperparameters.
        shapes: projection name -> (in_features, out_features), as `BaseInfo.linear_shapes`.

    Returns module path (`model.layers.0.self_attn.q_proj`) -> wrapper, in layer order.
    """
    model.requires_grad_(False)
    wrappers: dict[str, LoraLinear] = {}
    names = dict(model.named_modules())
    for layer in _decoder_layers(model):
        dropouts: dict[str, SharedDropout] = {}
        for projection in spec.target_modules:
            parent = _projection_parent(layer, projection)
            base = getattr(parent, projection)
            dropout = dropouts.setdefault(INPUT_GROUPS[projection], SharedDropout(spec.dropout))
            wrapper = LoraLinear(base, *shapes[projection], spec, dropout=dropout)
            setattr(parent, projection, wrapper)
            group = "self_attn" if parent is layer.self_attn else "mlp"
            wrappers[f"{_layer_prefix(names, layer)}.{group}.{projection}"] = wrapper
    return wrappers


def _layer_prefix(names: dict[str, nn.Module], layer: nn.Module) -> str:
    for name, module in names.items():
        if module is layer:
            return name
    raise LoraConfigError("decoder layer not found among the model's modules")


def lora_parameters(wrappers: dict[str, LoraLinear]) -> list[nn.Parameter]:
    return [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]


def export_lora(wrappers: dict[str, LoraLinear], spec: LoraSpec, base_name: str | None = None) -> LoraWeights:
    """The trained adapter as a `LoraWeights` (float32 copies), ready for `write_peft`."""
    modules = {
        path: LoraModule(A=w.lora_A.detach().float().clone(), B=w.lora_B.detach().float().clone(), scaling=w.scaling)
        for path, w in wrappers.items()
    }
    config = peft_config(
        spec.rank,
        spec.alpha,
        list(spec.target_modules),
        use_rslora=spec.use_rslora,
        dropout=spec.dropout,
        base_model_name_or_path=base_name,
    )
    return LoraWeights(config=config, modules=modules)

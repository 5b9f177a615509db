"""PEFT's on-disk LoRA format <-> `LoraWeights`, the adapter as a value.

A PEFT LoRA adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`
whose keys are `base_model.model.<module path>.lora_A.weight` (shape `[r, in]`) and
`...lora_B.weight` (`[out, r]`). The effective update of a module is `scaling * B @ A` with
`scaling = alpha / r` (or `alpha / sqrt(r)` under rsLoRA), where `r` and `alpha` may be
overridden per module by `rank_pattern` / `alpha_pattern`. This module only converts; checking an
adapter against a base is `validate.py`'s job.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROVENANCE_FILE = "loraswap.json"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class Patterns:
    """A `rank_pattern` / `alpha_pattern` dict with its keys compiled once.

    PEFT's rule: a key applies when the module path ends with it (after a dot); the first key
    in the dict's order that matches wins. Compiling once matters because validation asks for
    every module of the base; the keys are trusted here (`adapter_config` refuses all but plain
    module names before any pattern is compiled).
    """

    def __init__(self, patterns: dict[str, float | int] | None):
        self._compiled = [(key, re.compile(rf"(.*\.)?({key})$"), value) for key, value in (patterns or {}).items()]

    def key_for(self, module: str) -> str | None:
        """The first key that applies to `module`, or None."""
        return next((key for key, regex, _ in self._compiled if regex.match(module)), None)

    def value(self, module: str, default):
        return next((value for _, regex, value in self._compiled if regex.match(module)), default)


def pattern_value(patterns: dict[str, float | int], module: str, default):
    """PEFT's rule for one lookup (compiles the keys; use `Patterns` for many lookups)."""
    return Patterns(patterns).value(module, default)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    if rank < 1:  # a zero-rank tensor must never reach a division
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class LoraModule:
    """One adapted linear layer: `A` (r, in), `B` (out, r) and the scalar applied to `B @ A`."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense weight update `scaling * B @ A`, shape (out, in), in float32."""
        return self.scaling * (self.B.float() @ self.A.float())


@dataclass
class LoraWeights:
    """A LoRA adapter: its PEFT config (as a dict) and its modules keyed by module path.

    Module paths are those of the base model without PEFT's prefix, e.g.
    `model.layers.0.self_attn.q_proj`.
    """

    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        """The distinct projection names adapted (`q_proj`, ...), sorted."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.modules})

    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


def module_scaling(config: dict, module: str, rank: int, alphas: Patterns | None = None) -> float:
    """The scaling PEFT applies to `module`, honouring alpha_pattern and use_rslora.

    `alphas` is the config's alpha_pattern already compiled, when the caller asks for many modules.
    """
    alphas = alphas or Patterns(config.get("alpha_pattern"))
    alpha = alphas.value(module, config.get("lora_alpha", 8))
    return lora_scaling(float(alpha), rank, bool(config.get("use_rslora", False)))


def pair_keys(keys) -> dict[str, dict[str, str]]:
    """module path -> {"A": key, "B": key} for PEFT tensor keys; ValueError on a stray or lone key.

    Works on names alone, so validation can check a file's structure from its header before
    any tensor is loaded.
    """
    pairs: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _KEY_RE.match(key)
        if not match:
            raise ValueError(f"unexpected tensor key {key!r} (want base_model.model.<module>.lora_A/B.weight)")
        pair = pairs.setdefault(match["module"], {})
        if match["which"] in pair:  # e.g. `lora_A.weight` and `lora_A.default.weight` together
            raise ValueError(f"module {match['module']!r} has more than one lora_{match['which']} tensor")
        pair[match["which"]] = key
    for path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise ValueError(f"module {path!r} has no lora_{missing} tensor")
    return dict(sorted(pairs.items()))


def tensors_to_modules(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModule]:
    """Pair `lora_A` / `lora_B` tensors by module path; raises ValueError on a stray or lone key."""
    modules = {}
    alphas = Patterns(config.get("alpha_pattern"))
    for path, keys in pair_keys(tensors).items():
        pair = {which: tensors[key] for which, key in keys.items()}
        if pair["A"].dim() != 2 or pair["B"].dim() != 2:
            raise ValueError(f"module {path!r}: lora_A and lora_B must be matrices")
        rank = pair["A"].shape[0]
        modules[path] = LoraModule(A=pair["A"], B=pair["B"], scaling=module_scaling(config, path, rank, alphas))
    return modules


def read_peft(directory: Path | str) -> LoraWeights:
    """Load a PEFT LoRA directory (config + safetensors). No validation against a base."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    tensors = load_file(str(directory / WEIGHTS_FILE))
    return LoraWeights(config=config, modules=tensors_to_modules(config, tensors))


def peft_config(
    rank: int,
    alpha: float,
    target_modules: list[str],
    *,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
) -> dict:
    """A minimal adapter_config.json that PEFT loads."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def write_peft(weights: LoraWeights, directory: Path | str, provenance: dict | None = None) -> Path:
    """Write `weights` as a PEFT directory (and `loraswap.json` when provenance is given).

    The config's per-module ranks must match the tensors: callers that mix ranks set
    `rank_pattern`. Tensors are written contiguous, in their own dtype.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, module in weights.modules.items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = module.A.contiguous()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = module.B.contiguous()
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(weights.config, indent=2, sort_keys=True))
    if provenance is not None:
        (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return directory

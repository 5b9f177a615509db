"""Builders shared by the adapter tests: random LoRA weights for a base, raw safetensors, snapshots."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from adapters.base import BaseInfo
from adapters.format import LoraModule, LoraWeights, module_scaling, pattern_value, peft_config

TARGETS = ("q_proj", "v_proj", "down_proj")


def make_weights(
    base: BaseInfo,
    *,
    rank: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = TARGETS,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    layers: tuple[int, ...] | None = None,
) -> LoraWeights:
    """Random non-zero A and B for every targeted module of `base`, ranks per rank_pattern."""
    config = peft_config(
        rank, alpha, list(targets), use_rslora=use_rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern
    )
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in layers if layers is not None else range(base.num_layers):
        for projection in targets:
            path = base.module_path(layer, projection)
            in_features, out_features = base.linear_shapes[projection]
            r = pattern_value(rank_pattern or {}, path, rank)
            A = torch.randn(r, in_features, generator=generator) / in_features**0.5  # (r, in)
            B = torch.randn(out_features, r, generator=generator) / r**0.5  # (out, r)
            modules[path] = LoraModule(A.to(dtype), B.to(dtype), module_scaling(config, path, r))
    return LoraWeights(config=config, modules=modules)


def raw_safetensors(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    """Serialize a safetensors container by hand (lets tests write malformed ones)."""
    text = json.dumps(header).encode()
    length = len(text) if header_len is None else header_len
    return struct.pack("<Q", length) + text + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (directories as 'dir')."""
    state = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if rel == ".lock":
            continue
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state

"""Adapter uploads for the tiny base, as file name -> bytes: valid ones and one per hostile class.

Valid adapters are PEFT directories written by our own `write_peft` from random A/B (as
tests/adapters/helpers.py builds them), with an update small next to the base weights. Each
hostile one looks like a PEFT adapter and breaks exactly one bound of issue 9.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.base import BaseInfo
from adapters.format import write_peft
from tests.adapters.helpers import make_weights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def valid_adapter(
    base: BaseInfo, seed: int, rank: int = 4, targets=("q_proj", "v_proj", "down_proj"), b_scale: float = 0.25
) -> dict[str, bytes]:
    """A well-behaved adapter: ||scaling * B @ A|| well below the base weight's norm."""
    weights = make_weights(base, rank=rank, alpha=rank, targets=targets, seed=seed)
    for module in weights.modules.values():
        module.B.mul_(b_scale)
    with tempfile.TemporaryDirectory() as tmp:
        write_peft(weights, tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}


def _with_config(files: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(files[CONFIG])
    config.update(changes)
    return {**files, CONFIG: json.dumps(config).encode()}


def _with_tensors(files: dict[str, bytes], change) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        path.write_bytes(files[WEIGHTS])
        tensors = load_file(str(path))
        tensors = change(tensors)
        save_file(tensors, str(path))
        return {**files, WEIGHTS: path.read_bytes()}


def raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


def huge_alpha(base: BaseInfo) -> dict[str, bytes]:
    """`lora_alpha: 1e300`: scaling = 1e300 / r, finite in float64, inf in any compute dtype."""
    return _with_config(valid_adapter(base, seed=101), lora_alpha=1e300)


def near_float32_max(base: BaseInfo) -> dict[str, bytes]:
    """B entries at 3e38: finite as stored, inf after the first multiply."""

    def change(tensors):
        return {k: (torch.full_like(v, 3.0e38) if "lora_B" in k else v) for k, v in tensors.items()}

    return _with_tensors(valid_adapter(base, seed=102), change)


def zero_rank(base: BaseInfo) -> dict[str, bytes]:
    """`r: 0` with (0, in) / (out, 0) tensors: a ZeroDivisionError in the scaling today."""
    files = _with_config(valid_adapter(base, seed=103), r=0, lora_alpha=8)

    def change(tensors):
        out = {}
        for k, v in tensors.items():
            out[k] = torch.zeros((0, v.shape[1]) if "lora_A" in k else (v.shape[0], 0), dtype=v.dtype)
        return out

    return _with_tensors(files, change)


def scalar_tensor(base: BaseInfo) -> dict[str, bytes]:
    """A 0-d `lora_A`: the server dropped the connection with no answer."""

    def change(tensors):
        first = next(k for k in tensors if "lora_A" in k)
        return {**tensors, first: torch.tensor(1.0)}

    return _with_tensors(valid_adapter(base, seed=104), change)


def giant_shape(base: BaseInfo) -> dict[str, bytes]:
    """A header declaring shape [2**64, 0] (zero bytes of data): it must not reach the library."""
    files = valid_adapter(base, seed=105)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = {key: {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}
    return {**files, WEIGHTS: raw_safetensors(header)}


def many_alpha_patterns(base: BaseInfo, count: int = 70_000) -> dict[str, bytes]:
    """70,000 short `alpha_pattern` keys (under the 1 MiB config cap): seconds of regex work per
    upload and per load today."""
    patterns = {f"p{i}": 8 for i in range(count)}
    return _with_config(valid_adapter(base, seed=106), alpha_pattern=patterns)


def many_tensors(count: int = 240_000) -> dict[str, bytes]:
    """A 240,000-entry safetensors header of empty tensors (~13 MB of JSON, under the upload cap)."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: raw_safetensors(header)}


HOSTILE = {
    "huge_alpha": huge_alpha,
    "near_float32_max": near_float32_max,
    "zero_rank": zero_rank,
    "scalar_tensor": scalar_tensor,
    "giant_shape": giant_shape,
    "many_alpha_patterns": many_alpha_patterns,
}

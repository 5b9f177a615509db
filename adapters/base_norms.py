"""Per-module Frobenius norms of a base's linear weights, the yardstick for adapter updates.

Validation bounds `||scaling * B @ A||_F / ||W||_F` per module, so it needs `||W||_F` for every
LoRA-targetable module. They are read once from the base's floating-point safetensors on disk
(never the NF4 copy the server runs, so nothing is dequantized), computed in float64, and cached
beside the weights in `.loraswap-norms.json` keyed by the base fingerprint, so a restart does not
read the weights again. A module whose weight is not stored under `<path>.weight` has no norm.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

NORMS_FILE = ".loraswap-norms.json"


def read_weight_norms(model_dir: Path, module_paths: set[str] | dict, fingerprint: str = "") -> dict[str, float]:
    """module path -> ||W||_F (float64) for each of `module_paths` found in `model_dir`.

    Args:
        model_dir: a Hugging Face directory with `*.safetensors` weights.
        module_paths: the paths to measure (e.g. `BaseInfo.all_module_paths()`).
        fingerprint: the base's content fingerprint; when given, the result is cached on disk
            under it (an empty fingerprint means no disk cache).
    """
    wanted = set(module_paths)
    cache = Path(model_dir) / NORMS_FILE
    if fingerprint:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("fingerprint") == fingerprint:
                return {path: float(norm) for path, norm in cached["norms"].items() if path in wanted}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no cache or an unreadable one: measure again
    norms = _measure(Path(model_dir), wanted)
    if fingerprint:
        try:
            cache.write_text(json.dumps({"fingerprint": fingerprint, "norms": norms}))
        except OSError:
            pass  # a read-only model directory just means measuring again next time
    return norms


def _measure(model_dir: Path, wanted: set[str]) -> dict[str, float]:
    norms = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                path = key.removesuffix(".weight")
                if key.endswith(".weight") and path in wanted:
                    weight = fh.get_tensor(key)  # (out, in), one tensor at a time
                    norms[path] = float(torch.linalg.vector_norm(weight.double()))
    return norms

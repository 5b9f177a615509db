"""A weighted mix of adapters as one LoRA adapter, exactly: the `cat` merge, computed in memory.

`sum_k w_k * s_k * B_k @ A_k` is one LoRA with `A = [A_1; A_2; ...]` (rank `sum_k r_k`) and
`B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]` at scaling 1, so a mix runs through the engine's ordinary
batched LoRA path as a single adapter: no per-adapter loop at step time, no saved merge. A mix is
identified by its content (`mix_id`), not by names: the same components with the same weights are
the same mix for the engine's slots and for the prefix cache, whatever order the request gave.
Nothing here knows about tenants, the store or the engine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from adapters.format import LoraModule, LoraWeights

MIX_PREFIX = "mix:"


def canonical_parts(parts: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """(content id, weight) pairs in the one order a mix is identified and composed in."""
    return sorted(((content_id, float(weight)) for content_id, weight in parts), key=lambda p: (p[0], p[1].hex()))


def mix_id(parts: Sequence[tuple[str, float]]) -> str:
    """`mix:` + sha256 over the sorted (component content id, exact weight) pairs.

    `float.hex` is the weight's exact value, so 0.7 and 0.7000000000000001 are different mixes.
    """
    canonical = [[content_id, weight.hex()] for content_id, weight in canonical_parts(parts)]
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    return MIX_PREFIX + digest


def mix_ranks(components: Sequence[LoraWeights]) -> dict[str, int]:
    """Module path -> the rank the mix needs there (the sum of the ranks of the components adapting it)."""
    ranks: dict[str, int] = {}
    for weights in components:
        for path, module in weights.modules.items():
            ranks[path] = ranks.get(path, 0) + module.rank
    return ranks


def compose_mix(components: Sequence[tuple[LoraWeights, float]]) -> LoraWeights:
    """The mix `sum_k w_k * s_k * B_k @ A_k` as one adapter at scaling 1 (float32).

    Args:
        components: (adapter, weight) pairs, in the order their ranks are concatenated.

    Raises:
        ValueError: a module's shapes differ between components (they adapt different bases).
    """
    paths = sorted({path for weights, _ in components for path in weights.modules})
    modules = {}
    for path in paths:
        present = [(weight, weights.modules[path]) for weights, weight in components if path in weights.modules]
        shapes = {(m.B.shape[0], m.A.shape[1]) for _, m in present}
        if len(shapes) > 1:
            raise ValueError(f"module {path} has different shapes in the mixed adapters: {sorted(shapes)}")
        A = torch.cat([m.A.float() for _, m in present], dim=0)  # (sum r, in)
        B = torch.cat([(weight * m.scaling) * m.B.float() for weight, m in present], dim=1)  # (out, sum r)
        modules[path] = LoraModule(A=A, B=B, scaling=1.0)
    return LoraWeights(config={"mix": True}, modules=modules)

"""Numeric bounds on an adapter: its update must stay in proportion to the base it adapts.

A LoRA module adds `scaling * B @ A` to a base weight `W`. Values that are finite in the file
can still be absurd (`lora_alpha: 1e300`, entries near the float32 limit) and turn into inf/NaN
inside a batched forward pass. `check_bounds` refuses, per module and cheapest first: a scaling
over `max_scaling`, an |A| or |B| entry over `max_abs_value`, and a relative update
`||scaling * B @ A||_F / ||W||_F` over `max_delta_ratio`. The update norm never builds the
(out, in) product: `||B A||_F^2 = trace((A A^T)(B^T B))` from two r x r Gram matrices, in float64.

Why these defaults: PEFT initialises B to zero, so a freshly initialised adapter has ratio 0
whatever its alpha (tests/adapters/test_bounds.py checks alpha 1024 at r=1 and rsLoRA 8192 at
r=64); the persona adapter the trainer makes on the default base (r=8, alpha=16, lr 1e-3, two
epochs; tests/trainer/test_persona.py) measures at most 0.014 over its 210 modules, with
|A| <= 0.053 and |B| <= 0.014; even the random adapters the tests build (A ~ N(0, 1/in),
B ~ N(0, 1/r)) measure about 1 to 4.6 on the tiny base, whose weights are scaled up. A ratio
of 8 is an update eight times the size of the weight itself (a replacement, not an adaptation);
scaling 1024 admits alpha 1024 at r=1 (or rsLoRA alpha 8192 at r=64); 1e4 per entry is orders
above any trained value yet keeps `s * B @ A` and the activations it multiplies far inside float32
and bfloat16 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


from adapters.errors import AdapterOutOfRange
from adapters.format import LoraModule, LoraWeights


@dataclass(frozen=True)
class AdapterBounds:
    """Upper bounds on an adapter's numbers (settings; all must be finite and > 0).

    Args:
        max_scaling: largest |scaling| of a module (alpha / r, or alpha / sqrt(r) with rsLoRA).
        max_abs_value: largest |entry| of any lora_A or lora_B tensor.
        max_delta_ratio: largest `||scaling * B @ A||_F / ||W||_F` of a module.
    """

    max_scaling: float = 1024.0
    max_abs_value: float = 1e4
    max_delta_ratio: float = 8.0

    def __post_init__(self):
        for setting in fields(self):
            value = getattr(self, setting.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{setting.name} must be a finite number > 0, got {value!r}")


def delta_norm(module: LoraModule) -> float:
    """`||scaling * B @ A||_F` through the r x r Gram matrices, in float64."""
    A, B = module.A.double(), module.B.double()  # (r, in), (out, r)
    gram_a, gram_b = A @ A.T, B.T @ B  # (r, r) each, both symmetric
    squared = float((gram_a * gram_b).sum())  # trace(gram_a @ gram_b)
    return abs(module.scaling) * math.sqrt(max(squared, 0.0))


def check_bounds(weights: LoraWeights, base_norms: dict[str, float], bounds: AdapterBounds) -> None:
    """Refuse the first module whose numbers exceed `bounds` (modules in path order).

    Args:
        weights: the adapter (finite values; NaN/Inf are the caller's earlier check).
        base_norms: module path -> ||W||_F of the base; a module missing here is checked
            for scaling and magnitudes only.
        bounds: the limits.

    Raises:
        AdapterOutOfRange: 422 `adapter_out_of_range` naming the module, the figure and the bound.
    """
    for path in sorted(weights.modules):
        module = weights.modules[path]
        if not math.isfinite(module.scaling) or abs(module.scaling) > bounds.max_scaling:
            raise AdapterOutOfRange(f"{path}: scaling = {module.scaling:.3g} exceeds {bounds.max_scaling:g}")
        for which, tensor in (("lora_A", module.A), ("lora_B", module.B)):
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if not peak <= bounds.max_abs_value:  # also catches NaN
                raise AdapterOutOfRange(f"{path}: max |{which}| = {peak:.3g} exceeds {bounds.max_abs_value:g}")
        if path not in base_norms:
            continue
        ratio = _ratio(delta_norm(module), base_norms[path])
        if not ratio <= bounds.max_delta_ratio:
            raise AdapterOutOfRange(f"{path}: ||scaling*B@A||/||W|| = {ratio:.2g} exceeds {bounds.max_delta_ratio:g}")


def _ratio(update: float, base: float) -> float:
    if base > 0:
        return update / base
    return math.inf if update > 0 else 0.0  # any update of an all-zero weight is out of proportion


def measure(weights: LoraWeights, base_norms: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per module: scaling, max |A|, max |B| and the relative update (for reports and tuning)."""
    return {
        path: {
            "scaling": module.scaling,
            "max_abs_A": float(module.A.abs().max()),
            "max_abs_B": float(module.B.abs().max()),
            "delta_ratio": _ratio(delta_norm(module), base_norms[path]) if path in base_norms else math.nan,
        }
        for path, module in sorted(weights.modules.items())
    }

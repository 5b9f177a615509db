"""Merging LoRA adapters: linear / task_arithmetic / ties / dare_linear / dare_ties / cat.

Every method works on each module's exact weight delta `ΔW = s·B·A` (out, in), never on A and
B separately: averaging A's and B's independently adds cross terms `B_i·A_j` that no input had.
The combining rules are pure tensor functions over a stack of deltas `(n, out, in)` and a weight
vector `(n,)`; `merge_adapters` applies one to every module path (a module absent from an input is
a zero delta there) and re-factors the result by truncated SVD to a LoRA of the requested rank,
recording the relative Frobenius error of that step. `cat` is the exception: it stacks the inputs'
factors along the rank axis, so its delta is exactly the weighted sum with no SVD at all.

This module knows nothing about files, the store or HTTP; `trainer/merge_cli.py` and the server's
merge endpoint both call `merge_adapters`.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from adapters.bounds import AdapterBounds, check_bounds
from adapters.errors import AdapterError, AdapterOutOfRange
from adapters.format import LoraModule, LoraWeights, peft_config
from adapters.provenance import Provenance

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "cat")
DEFAULT_MAX_RANK = 64
# |weight| of one input. Real merges use weights around [-2, 2]; the bound keeps every sum of
# bounded inputs (`adapters.bounds`) far inside float32, so no merge of valid inputs overflows.
MAX_MERGE_WEIGHT = 100.0
# Provenance keys that identify what an adapter was trained against (see adapters/provenance.py).
FINGERPRINT_KEY = "base_fingerprint"
TEMPLATE_KEY = "chat_template_sha256"
VOCAB_KEY = "tokenizer_vocab_size"


class MergeError(AdapterError, ValueError):
    """A merge request that cannot be carried out (bad method, density, rank or shapes); 400."""

    def __init__(self, message: str, code: str = "invalid_merge", status: int = 400, param: str | None = None):
        super().__init__(message, code, status, param)


class IncompatibleAdapters(MergeError):
    """The inputs were trained against different bases or chat templates; 422 on `adapters`."""

    def __init__(self, message: str):
        super().__init__(message, "incompatible_adapters", 422, "adapters")


# ---------------------------------------------------------------------------------------------
# Combining rules on stacked deltas. `deltas` is (n, out, in), `weights` is (n,).
# ---------------------------------------------------------------------------------------------


def _weighted(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return deltas * weights.to(deltas.dtype).view(-1, 1, 1)  # (n, out, in)


def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum `Σ w_i ΔW_i` (Ilharco et al., task arithmetic), shape (out, in)."""
    return _weighted(deltas, weights).sum(dim=0)


def linear(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Identical to `task_arithmetic` here: on exact deltas a "linear" merge is the weighted sum.

    (PEFT's `add_weighted_adapter(combination_type="linear")` combines A and B separately, which
    is only exact for a single input; its `"svd"` variant is what this computes.)
    """
    return task_arithmetic(deltas, weights)


def trim_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `int(density * numel)` largest-magnitude entries of one delta, zero the rest."""
    if density >= 1.0:
        return delta
    k = int(density * delta.numel())
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(k).indices] = 1
    return (flat * keep).view_as(delta)


def drop_random(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, rescale survivors by `1 / density`.

    The mask is one `torch.bernoulli` draw from `generator`, the same call PEFT makes on the
    global generator, so a generator seeded like the global one gives PEFT's exact mask.
    """
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def disjoint_mean(trimmed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """TIES' elect + disjoint merge over already sparsified deltas `(n, out, in)`.

    The sign of each parameter is elected by total mass `sign(Σ_i τ_i)` (ties go to +), then the
    weighted values `w_i τ_i` whose own sign agrees with it are averaged over how many agree.
    As in PEFT, the weights multiply the values *after* the election; the TIES paper has one global
    λ instead, which this equals when all weights are λ. With a negative weight (task negation)
    the paper would negate the task vector before electing; PEFT, and this, do not.
    """
    elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)  # (out, in)
    agrees = trimmed.sign() == elected  # (n, out, in); zeros (trimmed away) never agree
    total = (_weighted(trimmed, weights) * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


def ties(deltas: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): trim each delta to its top-`density`, elect, disjoint mean.

    Trimming is per module (per tensor), as in PEFT and mergekit; the paper trims each task
    vector globally across the whole model.
    """
    trimmed = torch.stack([trim_magnitude(d, density) for d in deltas])  # (n, out, in)
    return disjoint_mean(trimmed, weights)


def dare_linear(
    deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator
) -> torch.Tensor:
    """DARE (Yu et al. 2023) then the weighted sum. Inputs are dropped in order, one draw each."""
    dropped = torch.stack([drop_random(d, density, generator) for d in deltas])
    return task_arithmetic(dropped, weights)


def dare_ties(deltas: torch.Tensor, weights: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's random drop + rescale in place of TIES' magnitude trim, then elect + disjoint mean."""
    dropped = torch.stack([drop_random(d, density, generator) for d in deltas])
    return disjoint_mean(dropped, weights)


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 LoRA factors from a truncated SVD, `sqrt(S)` in each so neither holds all the scale."""
    root = S.clamp(min=0).sqrt()
    return (root[:, None] * Vh).float(), (U * root).float()  # A (r, in), B (out, r)


def _relative_error(exact: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    norm = torch.linalg.matrix_norm(exact)
    if norm == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(exact - B.double() @ A.double()) / norm)


def svd_refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of a dense `delta` (out, in) (Eckart–Young) and their error.

    Returns `A` (r, in) and `B` (out, r) in float32 with `B @ A ≈ delta` at scaling 1, and the
    relative Frobenius error `‖delta - B·A‖_F / ‖delta‖_F` (0 for a zero delta). The top singular
    pairs come from `eigh` of the Gram matrix of the smaller side in float64, several times cheaper
    on a CPU than a full SVD of the (out, in) matrix and as accurate for the leading directions.
    """
    exact = delta.double()
    out_f, in_f = exact.shape
    r = max(1, min(rank, out_f, in_f))
    if in_f <= out_f:
        evals, V = torch.linalg.eigh(exact.T @ exact)  # ascending; V (in, in)
        V = V[:, -r:].flip(-1)  # (in, r), largest first
        S = evals[-r:].flip(-1).clamp(min=0).sqrt()  # (r,)
        US = exact @ V  # (out, r) = U_r S_r
        U = US / torch.where(S > 0, S, 1.0)
        Vh = V.T
    else:
        evals, U = torch.linalg.eigh(exact @ exact.T)  # U (out, out)
        U = U[:, -r:].flip(-1)  # (out, r)
        S = evals[-r:].flip(-1).clamp(min=0).sqrt()
        Vh = (U.T @ exact) / torch.where(S > 0, S, 1.0)[:, None]  # (r, in)
    # A direction with (numerically) zero singular value carries nothing: zero it rather than
    # keep an unnormalised vector.
    S = torch.where(S > S.max() * 1e-12, S, torch.zeros_like(S)) if S.numel() else S
    A, B = _split(U, S, Vh)
    return A, B, _relative_error(exact, A, B)


def svd_refactor_factored(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`svd_refactor(B @ A, rank)` for a delta given as factors `B` (out, R), `A` (R, in).

    Exact and cheap for the linear merges, whose delta is `B_cat @ A_cat`: with `B = Q_b R_b` and
    `A^T = Q_a R_a`, the SVD of the small core `R_b R_a^T` (R, R) gives that of the product.
    """
    Qb, Rb = torch.linalg.qr(B.double())  # (out, k), (k, R)
    Qa, Ra = torch.linalg.qr(A.double().T)  # (in, m), (m, R)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (k, m)
    r = max(1, min(rank, S.numel()))
    A_r, B_r = _split(Qb @ Uc[:, :r], S[:r], Vch[:r] @ Qa.T)
    total = (S**2).sum()
    # all singular values of the product are those of the core, so Eckart–Young is exact here
    error = float(((S[r:] ** 2).sum() / total).sqrt()) if total > 0 else 0.0
    return A_r, B_r, error


# ---------------------------------------------------------------------------------------------
# Adapters in, adapter out.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeInput:
    """One adapter to merge: its weights, its coefficient, its provenance (loraswap.json)."""

    weights: LoraWeights
    weight: float = 1.0
    provenance: dict | Provenance | None = None
    name: str = ""


@dataclass(frozen=True)
class MergeResult:
    """The merged adapter, its provenance and the per-module SVD error (empty for `cat`)."""

    weights: LoraWeights
    provenance: dict
    svd_errors: dict[str, float] = field(default_factory=dict)


def _as_dict(provenance) -> dict:
    if provenance is None:
        return {}
    if hasattr(provenance, "model_dump"):  # the pydantic Provenance model
        return provenance.model_dump(exclude_none=True)
    return dict(provenance)


def shared_identity(inputs: list[MergeInput]) -> dict:
    """The base fingerprint and template sha the inputs agree on; refuses inputs that disagree.

    Inputs without provenance (or without a key) constrain nothing. Also keeps the tokenizer
    vocabulary size when the inputs that record one agree on it.
    """
    shared, problems = {}, []
    for key, what in ((FINGERPRINT_KEY, "base model fingerprint"), (TEMPLATE_KEY, "chat-template sha256")):
        provided = [(item.name or f"input {i}", _as_dict(item.provenance).get(key)) for i, item in enumerate(inputs)]
        seen = [(name, value) for name, value in provided if value is not None]
        if len({value for _, value in seen}) > 1:
            listed = ", ".join(f"{name}={value[:12]}" for name, value in seen)
            problems.append(f"different {what} ({key}): {listed}")
        elif seen:
            shared[key] = seen[0][1]
    if problems:
        raise IncompatibleAdapters("cannot merge adapters trained on " + "; ".join(problems))
    vocab_sizes = {_as_dict(item.provenance).get(VOCAB_KEY) for item in inputs} - {None}
    if len(vocab_sizes) == 1:  # kept when unambiguous; the fingerprint already pins the base
        shared[VOCAB_KEY] = vocab_sizes.pop()
    return shared


def module_seed(seed: int, path: str) -> int:
    """A per-module generator seed: stable across runs and independent of which modules exist."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{path}".encode()).digest()[:8], "little") >> 1


def _module_shapes(inputs: list[MergeInput]) -> dict[str, tuple[int, int]]:
    """Every module path any input adapts -> (out, in); refuses paths whose shapes disagree."""
    shapes: dict[str, tuple[int, int]] = {}
    for item in inputs:
        for path, module in item.weights.modules.items():
            shape = (module.B.shape[0], module.A.shape[1])
            if shapes.setdefault(path, shape) != shape:
                raise MergeError(f"module {path} has shape {shape} in {item.name!r} but {shapes[path]} elsewhere")
    return dict(sorted(shapes.items()))


def _cat_module(inputs: list[MergeInput], path: str) -> LoraModule:
    """Exact: A_cat = [A_1; A_2; ...] (Σr, in), B_cat = [w_1 s_1 B_1, ...] (out, Σr), scaling 1."""
    present = [(item.weight, item.weights.modules[path]) for item in inputs if path in item.weights.modules]
    A = torch.cat([m.A.float() for _, m in present], dim=0)
    B = torch.cat([(w * m.scaling) * m.B.float() for w, m in present], dim=1)
    return LoraModule(A=A, B=B, scaling=1.0)


def _combine(method: str, deltas: torch.Tensor, weights: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    """The dense methods: ties, dare_linear, dare_ties on stacked deltas (n, out, in)."""
    if method == "ties":
        return ties(deltas, weights, density)
    generator = torch.Generator().manual_seed(seed)
    if method == "dare_linear":
        return dare_linear(deltas, weights, density, generator)
    return dare_ties(deltas, weights, density, generator)


def _svd_merge_module(
    inputs: list[MergeInput],
    path: str,
    shape: tuple[int, int],
    method: str,
    weights: torch.Tensor,
    density: float,
    seed: int,
    rank: int,
) -> tuple[LoraModule, float]:
    """One module of an SVD method: combine the inputs' deltas, refactor to `rank`, report the error."""
    if method in ("linear", "task_arithmetic"):
        # the weighted sum is exactly the cat factors' product: refactor it without densifying
        stacked = _cat_module(inputs, path)
        A, B, error = svd_refactor_factored(stacked.B, stacked.A, rank)
    else:
        zero = torch.zeros(shape)
        deltas = torch.stack(
            [item.weights.modules[path].delta() if path in item.weights.modules else zero for item in inputs]
        )  # (n, out, in)
        combined = _combine(method, deltas, weights, density, seed)
        if not bool(torch.isfinite(combined).all()):  # e.g. DARE's 1/density rescale of a tiny density
            raise AdapterOutOfRange(f"{path}: the merged update is not finite")
        A, B, error = svd_refactor(combined, rank)
    return LoraModule(A=A, B=B, scaling=1.0), error


def _unit_scaling_config(modules: dict[str, LoraModule], template: dict) -> dict:
    """A PEFT config whose per-module scaling is exactly 1: lora_alpha = r everywhere.

    The most common rank becomes `r`; every other module gets its rank and the same alpha through
    rank_pattern / alpha_pattern keyed by its full path (PEFT matches a key against the end of the
    module name, so a full path matches only itself). No rsLoRA, which would scale by alpha/sqrt(r).
    """
    ranks = {path: m.rank for path, m in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    others = {path: rank for path, rank in ranks.items() if rank != r}
    return peft_config(
        rank=r,
        alpha=r,
        target_modules=sorted({path.rsplit(".", 1)[-1] for path in modules}),
        rank_pattern=others,
        alpha_pattern=dict(others),
        base_model_name_or_path=template.get("base_model_name_or_path"),
    )


def _check_request(inputs, method, density, rank, max_rank) -> None:
    if not inputs:
        raise MergeError("nothing to merge: give at least one adapter")
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density}")
    if max_rank < 1 or (rank is not None and not 1 <= rank <= max_rank):
        raise MergeError(f"rank must be between 1 and max_rank={max_rank}, got {rank}")
    for item in inputs:
        if not (math.isfinite(item.weight) and abs(item.weight) <= MAX_MERGE_WEIGHT):
            raise MergeError(
                f"the weight of {item.name or 'an input'} is {item.weight:.3g}; weights must be finite "
                f"numbers in [-{MAX_MERGE_WEIGHT:g}, {MAX_MERGE_WEIGHT:g}]",
                param="adapters",
            )
    if not any(item.weights.modules for item in inputs):
        raise MergeError("the inputs adapt no modules")


def merge_adapters(
    inputs: list[MergeInput],
    method: str,
    *,
    density: float = 0.5,
    rank: int | None = None,
    seed: int = 0,
    max_rank: int = DEFAULT_MAX_RANK,
    bounds: AdapterBounds | None = None,
    base_norms: dict[str, float] | None = None,
) -> MergeResult:
    """Merge adapters into one LoRA adapter.

    Args:
        inputs: the adapters with their weights (coefficients), provenance and display names.
        method: one of `METHODS`.
        density: fraction kept by TIES' trim or DARE's random drop, in (0, 1].
        rank: the merged rank for the SVD methods; default per module is the sum of the ranks of
            the inputs adapting it, capped by `max_rank` (and by the module's smaller dimension).
        seed: seeds DARE's drop; each module draws from its own generator (`module_seed`).
        max_rank: the largest rank the result may have; `cat` is refused if it needs more.
        bounds: numeric bounds every input and the result must meet; None means the defaults.
        base_norms: module path -> ||W||_F of the base (`BaseInfo.weight_norms()`), so the
            result's update is also bounded relative to the base; None checks magnitudes only.

    Raises:
        MergeError: bad method / density / rank / weight, or shapes that disagree between inputs.
        AdapterOutOfRange: an input or the result out of `bounds` (422 `adapter_out_of_range`).
        IncompatibleAdapters: provenance records different base fingerprints or chat templates.
    """
    _check_request(inputs, method, density, rank, max_rank)
    bounds = bounds or AdapterBounds()
    for item in inputs:  # bounded inputs and weights keep every intermediate finite
        _check_finite_input(item)
        check_bounds(item.weights, {}, bounds)
    identity = shared_identity(inputs)
    weights = torch.tensor([float(item.weight) for item in inputs])  # (n,)
    modules, errors = {}, {}
    for path, shape in _module_shapes(inputs).items():
        if method == "cat":
            modules[path] = _cat_module(inputs, path)
            if modules[path].rank > max_rank:
                raise MergeError(
                    f"cat needs rank {modules[path].rank} for {path}, above max_rank={max_rank}; "
                    "use an SVD method (linear, ties, ...) with --rank instead"
                )
            continue
        input_rank = sum(item.weights.modules[path].rank for item in inputs if path in item.weights.modules)
        target_rank = min(rank or min(input_rank, max_rank), max_rank)
        modules[path], errors[path] = _svd_merge_module(
            inputs, path, shape, method, weights, density, module_seed(seed, path), target_rank
        )
    config = _unit_scaling_config(modules, inputs[0].weights.config)
    merged = LoraWeights(config=config, modules=modules)
    check_bounds(merged, base_norms or {}, bounds)
    provenance = Provenance.model_validate(
        {
            **identity,
            "merge": {
                "method": method,
                "inputs": [
                    {"name": item.name, "weight": float(item.weight), "rank": item.weights.max_rank} for item in inputs
                ],
                "density": density,
                "seed": seed,
                "rank": rank,
                "max_rank": max_rank,
                "svd_errors": errors,
                "svd_error_max": max(errors.values(), default=0.0),
            },
        }
    ).to_json_dict()
    return MergeResult(weights=merged, provenance=provenance, svd_errors=errors)


def _check_finite_input(item: MergeInput) -> None:
    for path, module in item.weights.modules.items():
        if not (math.isfinite(module.scaling) and torch.isfinite(module.A).all() and torch.isfinite(module.B).all()):
            raise AdapterOutOfRange(f"{item.name or 'an input'}: {path} holds NaN or Inf values")

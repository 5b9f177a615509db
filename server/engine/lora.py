"""The multi-LoRA linear layer: a wrapped base Linear / Linear4bit plus stacked slot tensors.

Each `MultiLoraLinear` holds every slot's A and B in layouts the `bmm`s read directly
(`A (num_slots + 1, parts, r, in)`, `Bt (num_slots + 1, parts, r, out)`), where slot 0 stays all
zeros (the base alone) and B is stored pre-multiplied by the adapter's scaling. Routing
is an index built once per step (`LoraStep`, shared by all layers): the step's tokens grouped by
slot into a padded `(num_active, max_tokens)` layout, so each layer does one gather, two `bmm`s
against the active slots and one gather back into token order — no Python loop over adapters
(the way back is a gather, not a scatter: CPU `index_add_` ran as a `scatter_add_` costing more
than the whole base matmul, and a gather simply drops the pads). A step whose
tokens all use one slot takes a two-matmul path; a folded slot runs a dense weight instead.
This module knows nothing about residency (slots.py) or when to fold (fold.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from server.engine import fused, packed


@dataclass(frozen=True)
class LoraStep:
    """How this step's tokens use adapters (built by `build_lora_step`)."""

    mode: str  # "single" | "grouped" | "fold"
    slot: int = 0  # the slot of "single" / "fold"
    active: torch.Tensor | None = None  # (num_active,) slot ids
    key: tuple = ()  # identifies (active slots, slot contents) for per-layer caches
    gather: torch.Tensor | None = None  # (num_active * max_tokens,) token rows; pads -> the group's first row
    max_tokens: int = 0
    # Each token's position in the grouped layout (slot s, index m -> s * max_tokens + m); a base
    # token points one past the end, at a row the layer keeps exactly zero.
    position: list[int] = field(default_factory=list, compare=False, repr=False)
    has_base: bool = False  # some token uses no adapter: the grouped output needs its zero row
    # The same grouping for the native kernel (fused.lora_sgmv), which needs no padding.
    segments: fused.LoraSegments | None = field(default=None, compare=False, repr=False)
    _part_positions: dict = field(default_factory=dict, compare=False, repr=False)

    def part_position(self, parts: int) -> torch.Tensor:
        """For the (T*parts, out_part) view of a fused output (token t, part p = row t*P + p): the row
        of the grouped `(S*P*M [+1 zero row], out_part)` update to add, built once per step per P."""
        if parts not in self._part_positions:
            S, M = len(self.key[0]), self.max_tokens
            rows = []
            for g in self.position:
                if g == S * M:  # a base token: every part reads the zero row
                    rows += [S * parts * M] * parts
                else:
                    s, m = divmod(g, M)
                    rows += [(s * parts + p) * M + m for p in range(parts)]
            device = self.gather.device if self.gather is not None else None
            self._part_positions[parts] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._part_positions[parts]


def build_lora_step(
    token_slots: list[int], version: int, device, dtype, fold_slot: int | None = None
) -> LoraStep | None:
    """Args:
    token_slots: the slot of every token of the step, in row order.
    version: `SlotTable.version`; bumps whenever any slot's contents change (invalidates layer caches).
    fold_slot: a slot whose dense folded weights are ready; used if it owns every token.
    """
    active = sorted(set(token_slots) - {0})
    if not active:
        return None
    rows: dict[int, list[int]] = {s: [] for s in active}
    for i, s in enumerate(token_slots):
        if s:
            rows[s].append(i)
    segments = fused.LoraSegments.of(rows) if torch.device(device).type == "cpu" else None
    if len(active) == 1 and 0 not in token_slots:
        mode = "fold" if fold_slot == active[0] else "single"
        return LoraStep(
            mode,
            slot=active[0],
            active=torch.tensor(active, device=device),
            key=(tuple(active), version),
            segments=segments,
        )
    max_tokens = max(len(r) for r in rows.values())
    # Pads read a row of their own group (its first token), never another adapter's or the base's
    # row, and their results are never gathered back: nothing of a pad reaches any token.
    gather: list[int] = []
    position = [len(active) * max_tokens] * len(token_slots)  # base tokens: the zero row
    for i, s in enumerate(active):
        for m, row in enumerate(rows[s]):
            position[row] = i * max_tokens + m
        gather += rows[s] + [rows[s][0]] * (max_tokens - len(rows[s]))
    return LoraStep(
        "grouped",
        active=torch.tensor(active, dtype=torch.long, device=device),
        key=(tuple(active), version),
        gather=torch.tensor(gather, dtype=torch.long, device=device),
        max_tokens=max_tokens,
        position=position,
        has_base=0 in token_slots,
        segments=segments,
    )


class MultiLoraLinear(nn.Module):
    """Wraps a base linear layer; `forward(x, lora)` adds each token's slot's `B @ A @ x`.

    A layer may fuse P projections of equal output size that read the same input (k/v,
    gate/up): the base weight is their concatenation, slot tensors are
    `A (num_slots + 1, P, r, in)` and `Bt (num_slots + 1, P, r, out_part)` (r = the widest rank
    loaded; narrower adapters are zero-padded), so one gather and one shrink `bmm` serve all
    parts, and the expand `bmm` runs the parts as extra batch entries with no wasted work.
    When the active slots are a contiguous range at full rank (the steady state: slots fill in
    order), the `bmm`s read the slot tensors through views; otherwise the active slots are
    gathered once per change of the active set.
    (Fused projections quantize to the same NF4 blocks as separate layers: blocks never cross a
    row when in_features is a multiple of 64.)
    """

    def __init__(
        self,
        base: nn.Module,
        in_features: int,
        parts: list[tuple[str, int]],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device,
        slot_dtype: torch.dtype | None = None,
    ):
        """slot_dtype: what the slot tensors store (default: the LoRA math's dtype, `lora_dtype`)."""
        super().__init__()
        sizes = {size for _, size in parts}
        if len(sizes) != 1:
            raise ValueError(f"fused parts must have equal output sizes, got {parts}")
        self.base = base
        self.parts = [name for name, _ in parts]
        self.num_parts, self.part_out = len(parts), sizes.pop()
        self.in_features, self.out_features = in_features, self.part_out * self.num_parts
        self.num_slots, self.max_rank = num_slots, max_rank
        self.dtype, self.device = dtype, device
        self.lora_dtype = lora_dtype(dtype, device)  # of the LoRA matmuls
        self.slot_dtype = slot_dtype or self.lora_dtype  # of the slot tensors
        self.slot_rank = [0] * (num_slots + 1)  # widest part rank held by each slot
        self._slot_rank_t = torch.zeros(num_slots + 1, dtype=torch.int64, device="cpu")  # for fused.lora_sgmv
        # Empty until `_alloc` (just below) gives them the stacked slot layout.
        self.A: torch.Tensor = torch.zeros(0)
        self.Bt: torch.Tensor = torch.zeros(0)
        self._alloc(0)
        self.folded_slot: int | None = None
        self.folded_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self._cache: tuple | None = None

    def part_slice(self, part: str) -> tuple[int, int]:
        """(offset, size) of a part's rows in the fused output."""
        return self.parts.index(part) * self.part_out, self.part_out

    def _alloc(self, rank: int) -> None:
        # Slot tensors grow to the largest rank loaded so far, so memory follows real adapters.
        n, P = self.num_slots + 1, self.num_parts
        A = torch.zeros(n, P, rank, self.in_features, dtype=self.slot_dtype, device=self.device)
        Bt = torch.zeros(n, P, rank, self.part_out, dtype=self.slot_dtype, device=self.device)
        if self.A.dim() == 4 and self.A.shape[2]:
            old = self.A.shape[2]
            A[:, :, :old] = self.A
            Bt[:, :, :old] = self.Bt
        self.A, self.Bt = A, Bt
        self._cache_key = None
        self._native_weights = fused.LoraWeights.of(A, Bt, self._slot_rank_t)

    @property
    def allocated_rank(self) -> int:
        return self.A.shape[2]

    def load_slot(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Write one adapter into `slot`: part name -> (A (r, in), B^T (r, out_part), scaling).

        B arrives transposed (the host cache does that off the engine loop), so both writes
        are plain copies.

        Parts the adapter does not adapt stay zero; an empty dict clears the slot.
        """
        old = self.slot_rank[slot]
        if old:
            self.A[slot, :, :old].zero_()
            self.Bt[slot, :, :old].zero_()
        rank = max((m[0].shape[0] for m in modules.values()), default=0)
        if rank > self.allocated_rank:
            self._alloc(min(self.max_rank, max(rank, 2 * self.allocated_rank)))
        for name, (A, Bt, scaling) in modules.items():
            p, r = self.parts.index(name), A.shape[0]
            self.A[slot, p, :r].copy_(A)
            self.Bt[slot, p, :r].copy_(Bt * scaling)  # B is stored pre-scaled (scaled, then rounded once)
        self.slot_rank[slot] = rank
        self._slot_rank_t[slot] = rank
        self._cache_key = None

    def dense_weight(self, slot: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """dequant(W0) + s * B @ A for `slot`, shape (out, in), in `dtype` (default: compute dtype)."""
        w = dequantized_weight(self.base).to(torch.float32)
        rank = self.slot_rank[slot]
        if rank:
            A = self.A[slot, :, :rank].float()  # (P, r, in)
            B = self.Bt[slot, :, :rank].transpose(1, 2).float()  # (P, out_p, r)
            delta = torch.bmm(B, A)  # (P, out_p, in)
            w = w + delta.reshape(self.out_features, self.in_features)
        return w.to(dtype or self.dtype)

    def fold(self, slot: int, dtype: torch.dtype) -> None:
        """Run `slot`'s tokens through a dense copy `dense_weight(slot)` from now on (prepacked
        where packed.py keeps the base so, or the fold would run slower than the base)."""
        weight = self.dense_weight(slot, dtype)
        if packed.supported(weight.device, dtype):
            weight = packed.pack(weight)
        self.folded_weight, self.folded_slot = weight, slot

    def unfold(self) -> None:
        self.folded_weight, self.folded_slot = None, None

    @staticmethod
    def group_input(x: torch.Tensor, lora: LoraStep | None) -> torch.Tensor | None:
        """x (T, in) gathered into the grouped `(S, M, in)` layout, or None if the step is not
        grouped or the native kernel serves it (it reads x in place); layers reading the same x
        (q and k/v) share it through `forward`'s `xs`."""
        if lora is None or lora.mode != "grouped" or (lora.segments is not None and fused.library() is not None):
            return None
        return MultiLoraLinear._gather(x, lora)

    @staticmethod
    def _gather(x: torch.Tensor, lora: LoraStep) -> torch.Tensor:
        assert lora.gather is not None
        xs = x.index_select(0, lora.gather).view(-1, lora.max_tokens, x.shape[1])
        return xs.to(lora_dtype(x.dtype, x.device))

    def forward(self, x: torch.Tensor, lora: LoraStep | None = None, xs: torch.Tensor | None = None) -> torch.Tensor:
        """x (T, in) -> (T, out); `xs` = `group_input(x, lora)` when already computed."""
        weight = self.folded_weight  # set together with folded_slot
        if lora is not None and lora.mode == "fold" and weight is not None and self.folded_slot == lora.slot:
            bias = None if self.base.bias is None else self.base.bias.to(weight.dtype)
            return packed.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
        y = self.base(x)
        if lora is None:
            return y
        if lora.segments is not None and self._native_weights is not None:
            if fused.lora_sgmv(y, x, self._native_weights, lora.segments):
                return y  # one native call (fused.py); below, the eager path it stands for
        At, Bt = self._active(lora)
        if At is None:
            return y  # no active adapter touches this layer
        P, T = self.num_parts, x.shape[0]
        if lora.mode != "grouped" and P == 1:  # one slot, one part: shrink, then expand-and-add in one op
            if y.dtype == At.dtype:
                return y.addmm_(torch.mm(x, At[0]), Bt[0])
            return y.add_(torch.mm(torch.mm(x.to(At.dtype), At[0]), Bt[0]))  # summed in fp32, as PEFT does
        if lora.mode != "grouped":  # every token uses one slot: no gather, no scatter
            shrunk = torch.mm(x.to(At.dtype), At[0])
            delta = self._expand(shrunk.unsqueeze(0), Bt).view(P, T, -1)  # (P, T, out_part)
            y.view(T, P, self.part_out).add_(delta.transpose(0, 1))
            return y
        if xs is None:
            xs = self._gather(x, lora)  # (S, M, in)
        h = torch.bmm(xs, At)  # (S, M, P*r)
        rows = h.shape[0] * P * lora.max_tokens
        out = None
        if lora.has_base:  # base tokens gather an exact zero row placed after the grouped updates
            out = torch.empty(rows + 1, self.part_out, dtype=h.dtype, device=y.device)
            out[rows:].zero_()
        delta = self._expand(h, Bt, out)  # (S*P*M [+1], out_part)
        # y viewed as (T*P, out_part): token t's part p is row t*P + p
        y.view(T * P, self.part_out).add_(delta.index_select(0, lora.part_position(P)))
        return y

    def _expand(self, h: torch.Tensor, Bt: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """h (S, M, P*r) -> updates (S*P*M, out_part), batch entry s*P + p; written into the first
        rows of `out` when given (which is returned)."""
        S, M, _ = h.shape
        P = self.num_parts
        if P > 1:
            h = h.view(S, M, P, -1).transpose(1, 2).reshape(S * P, M, -1)  # (S*P, M, r): a small copy
        if out is None:
            return torch.bmm(h, Bt).view(S * P * M, -1)
        torch.bmm(h, Bt, out=out[: S * P * M].view(S * P, M, -1))
        return out

    def _active(self, lora: LoraStep):
        """The active slots' A^T (S, in, P*r) and B^T (S*P, r, out_part) in the LoRA dtype, cached
        while the key holds.

        A^T is a transposed view of row-major A: BLAS reads it as is, no copy (unless the slots are
        stored narrower than the LoRA dtype: then this is one widened copy per change of key)."""
        if self._cache_key != lora.key:
            active = lora.key[0]
            rank = max(self.slot_rank[s] for s in active)  # this layer's own widest slot
            S, P, first = len(active), self.num_parts, active[0]
            if rank == 0:
                self._cache = (None, None)
            elif rank == self.allocated_rank and active == tuple(range(first, first + S)):
                self._cache = (
                    self.A[first : first + S].view(S, P * rank, self.in_features).transpose(1, 2),
                    self.Bt[first : first + S].view(S * P, rank, self.part_out),
                )  # views
            else:
                A = self.A[:, :, :rank].index_select(0, lora.active)  # (S, P, r, in)
                Bt = self.Bt[:, :, :rank].index_select(0, lora.active)  # (S, P, r, out_p)
                self._cache = (
                    A.reshape(S, P * rank, self.in_features).transpose(1, 2),
                    Bt.reshape(S * P, rank, self.part_out),
                )
            At, Bt = self._cache
            if At is not None and Bt is not None and self.slot_dtype != self.lora_dtype:
                self._cache = (At.to(self.lora_dtype), Bt.to(self.lora_dtype))
            self._cache_key = lora.key
        return self._cache


def lora_dtype(compute_dtype: torch.dtype, device) -> torch.dtype:
    """The dtype LoRA runs in: float32 on a CPU whatever the compute dtype.

    PEFT keeps a bf16 model's adapter weights in float32 (`autocast_adapter_dtype`) and adds the
    update to the base output in float32; and on a CPU the LoRA path's small bf16 matmuls ran
    3-7x slower than float32 ones (a rank-16 shrink over 8 slots: 31.8 against 9.7 us).
    """
    if torch.device(device).type == "cpu":
        return torch.float32
    return compute_dtype


def slot_dtype(compute_dtype: torch.dtype, device, setting: str = "auto") -> torch.dtype:
    """What the slot tensors store for `EngineConfig.lora_dtype` = `setting`: "auto" is the
    LoRA math's dtype (`lora_dtype`), "bfloat16" is bf16.

    On a CPU the mixed-adapter step is bound by memory, not arithmetic: 8 rank-16 all-linear
    adapters of the default base are 156 MB in float32 (more than half the base's 270 MB of bf16
    weights) streamed every step, and bf16 slots halve that. The kernel widens them to float32
    exactly, so only the rounding of A and B (B pre-scaled) to bf16 differs from float32 slots.
    """
    if setting == "bfloat16":
        return torch.bfloat16
    return lora_dtype(compute_dtype, device)


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense tensor (dequantizing a bitsandbytes Linear4bit).

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place on its first
    forward, and its "inverse" conversion neither restores the quant state exactly nor leaves it
    usable; so the loader keeps the original NF4 data and state (`nf4_source`) for this.
    """
    if isinstance(base, packed.PackedLinear):
        return base.dense_weight()
    source = getattr(base, "nf4_source", None)
    if source is None and getattr(base.weight, "quant_state", None) is not None:
        if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("a repacked Linear4bit without nf4_source cannot be dequantized")
        source = (base.weight.data, base.weight.quant_state)
    if source is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(source[0], source[1])
    return base.weight.data

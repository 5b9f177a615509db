"""The multi-LoRA linear layer: a wrapped base Linear / Linear4bit plus stacked slot tensors.

Each `LoraLinear` holds `A (num_slots + 1, r, in)` and `B (num_slots + 1, out, r)`, where slot 0
stays all zeros (the base alone) and B is stored pre-multiplied by the adapter's scaling. Routing
is an index built once per step (`LoraStep`, shared by all layers): the step's tokens grouped by
slot into a padded `(num_active, max_tokens)` layout, so each layer does one gather, two `bmm`s
against the active slots and one `index_add_` — no Python loop over adapters. A step whose
tokens all use one slot takes a two-matmul path; a folded slot runs a dense weight instead.
This module knows nothing about residency (slots.py) or when to fold (fold.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LoraStep:
    """How this step's tokens use adapters (built by `build_lora_step`)."""

    mode: str  # "single" | "grouped" | "fold"
    slot: int = 0  # the slot of "single" / "fold"
    active: torch.Tensor | None = None  # (num_active,) slot ids, grouped mode
    key: tuple = ()  # identifies (active slots, slot contents) for per-layer caches
    gather: torch.Tensor | None = None  # (num_active * max_tokens,) token rows; pads -> row 0
    mask: torch.Tensor | None = None  # (num_active, max_tokens, 1): 0 on pads; None if no pads
    max_tokens: int = 0


def build_lora_step(token_slots: list[int], generation: int, device, dtype,
                    fold_slot: int | None = None) -> LoraStep | None:
    """Args:
    token_slots: the slot of every token of the step, in row order.
    generation: bumps whenever any slot's contents change (invalidates layer caches).
    fold_slot: a slot whose dense folded weights are ready; used if it owns every token.
    """
    active = sorted(set(token_slots) - {0})
    if not active:
        return None
    if len(active) == 1 and 0 not in token_slots:
        mode = "fold" if fold_slot == active[0] else "single"
        return LoraStep(mode, slot=active[0])
    rows: dict[int, list[int]] = {s: [] for s in active}
    for i, s in enumerate(token_slots):
        if s:
            rows[s].append(i)
    max_tokens = max(len(r) for r in rows.values())
    gather, mask = [], []
    for s in active:
        pad = max_tokens - len(rows[s])
        gather += rows[s] + [0] * pad
        mask += [1.0] * len(rows[s]) + [0.0] * pad
    even = all(len(r) == max_tokens for r in rows.values())
    return LoraStep(
        "grouped",
        active=torch.tensor(active, dtype=torch.long, device=device),
        key=(tuple(active), generation),
        gather=torch.tensor(gather, dtype=torch.long, device=device),
        mask=None if even else torch.tensor(mask, dtype=dtype, device=device).view(len(active), max_tokens, 1),
        max_tokens=max_tokens,
    )


class LoraLinear(nn.Module):
    """Wraps a base linear layer; `forward(x, lora)` adds each token's slot's `B @ A @ x`.

    A layer may fuse several projections that read the same input (q/k/v, gate/up): `parts`
    names them with their output sizes, the base weight is their concatenation, and a slot
    stores the parts' A matrices stacked along the rank axis and their B matrices block-diagonally,
    so `B @ A` is exactly the stacked per-projection updates and one gather + two `bmm`s serve
    all parts. (Fused q/k/v quantize to the same NF4 blocks as separate layers: blocks never
    cross a row when in_features is a multiple of 64.)
    """

    def __init__(self, base: nn.Module, in_features: int, parts: list[tuple[str, int]], num_slots: int,
                 max_rank: int, dtype: torch.dtype, device):
        super().__init__()
        self.base = base
        self.parts = list(parts)
        self.in_features = in_features
        self.out_features = sum(size for _, size in parts)
        self.out_offsets = {}
        offset = 0
        for name, size in parts:
            self.out_offsets[name] = (offset, size)
            offset += size
        self.num_slots, self.max_rank = num_slots, max_rank * len(parts)
        self.dtype, self.device = dtype, device
        self.slot_rank = [0] * (num_slots + 1)  # total rank (all parts) held by each slot
        self.A: torch.Tensor | None = None
        self._alloc(0)
        self.folded_slot: int | None = None
        self.folded_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self._cache: tuple | None = None

    def _alloc(self, rank: int) -> None:
        # Slot tensors grow to the largest rank loaded so far, so memory follows real adapters.
        A = torch.zeros(self.num_slots + 1, rank, self.in_features, dtype=self.dtype, device=self.device)
        B = torch.zeros(self.num_slots + 1, self.out_features, rank, dtype=self.dtype, device=self.device)
        if self.A is not None and self.A.shape[1]:
            old = self.A.shape[1]
            A[:, :old] = self.A
            B[:, :, :old] = self.B
        self.A, self.B = A, B
        self._cache_key = None

    @property
    def allocated_rank(self) -> int:
        return self.A.shape[1]

    def load_slot(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write one adapter into `slot`: part name -> (A (r, in), scaling * B (out_part, r)).

        Parts the adapter does not adapt stay zero; an empty dict clears the slot.
        """
        old = self.slot_rank[slot]
        if old:
            self.A[slot, :old].zero_()
            self.B[slot, :, :old].zero_()
        total = sum(A.shape[0] for A, _ in modules.values())
        if total > self.allocated_rank:
            self._alloc(min(self.max_rank, max(total, 2 * self.allocated_rank)))
        r0 = 0
        for name, _ in self.parts:  # a fixed order keeps the layout independent of dict order
            if name not in modules:
                continue
            A, B = modules[name]
            o0, size = self.out_offsets[name]
            rank = A.shape[0]
            self.A[slot, r0:r0 + rank].copy_(A)
            self.B[slot, o0:o0 + size, r0:r0 + rank].copy_(B)
            r0 += rank
        self.slot_rank[slot] = total
        self._cache_key = None

    def dense_weight(self, slot: int) -> torch.Tensor:
        """dequant(W0) + s * B @ A for `slot`, in the compute dtype, shape (out, in)."""
        w0 = dequantized_weight(self.base).to(torch.float32)
        rank = self.slot_rank[slot]
        if rank:
            w0 = w0.addmm(self.B[slot, :, :rank].float(), self.A[slot, :rank].float())
        return w0.to(self.dtype)

    def forward(self, x: torch.Tensor, lora: LoraStep | None = None) -> torch.Tensor:
        """x (T, in) -> (T, out)."""
        if lora is not None and lora.mode == "fold" and self.folded_slot == lora.slot:
            return F.linear(x, self.folded_weight, self.base.bias)
        y = self.base(x)
        if lora is None:
            return y
        if lora.mode != "grouped":
            rank = self.slot_rank[lora.slot]
            if not rank:
                return y
            return torch.addmm(y, x @ self.A[lora.slot, :rank].t(), self.B[lora.slot, :, :rank].t())
        At, Bt = self._active(lora)
        if At is None:
            return y
        xs = x.index_select(0, lora.gather).view(-1, lora.max_tokens, self.in_features)  # (S, M, in)
        h = torch.bmm(xs, At)  # (S, M, r)
        if lora.mask is not None:
            h.mul_(lora.mask)  # padded rows contribute exactly zero to row 0
        delta = torch.bmm(h, Bt)  # (S, M, out)
        return y.index_add_(0, lora.gather, delta.view(-1, self.out_features))

    def _active(self, lora: LoraStep):
        """The active slots' A^T (S, in, r) and B^T (S, r, out), cached while the step key holds."""
        if self._cache_key != lora.key:
            rank = max(self.slot_rank[s] for s in lora.key[0])  # this layer's own widest slot
            if rank == 0:
                self._cache = (None, None)  # no active adapter touches this layer
            else:
                At = self.A[:, :rank].index_select(0, lora.active).transpose(1, 2).contiguous()
                Bt = self.B[:, :, :rank].index_select(0, lora.active).transpose(1, 2).contiguous()
                self._cache = (At, Bt)
            self._cache_key = lora.key
        return self._cache


def dequantized_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense tensor (dequantizing a bitsandbytes Linear4bit)."""
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnbf
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            return bnbf.dequantize_4bit(data, state)
        return bnbf.dequantize_4bit(weight.data, state)
    return weight.data

"""Fold: run one adapter's traffic through dense weights `dequant(W0) + s·B·A`, no LoRA overhead.

Before each step the engine tells the `FoldManager` which adapters the batch uses. An adapter
that owns the whole batch is folded when it is pinned (`fold` "pinned" or "auto") or, with
`fold="auto"`, once it has owned every batch for `fold_window` steps. At most one adapter is
folded at a time; its dense copies live beside the base layers (the base is never modified),
within `fold_budget` bytes. Traffic for anyone else unfolds an unpinned fold between steps.
The dense copies are kept in `dtype` (the engine picks it: see `fold_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.lora import MultiLoraLinear


@dataclass
class FoldStats:
    folds: int = 0
    unfolds: int = 0
    over_budget: int = 0


def fold_dtype(quant: str, device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of folded dense copies.

    The compute dtype, except for NF4 on a CPU with fast bf16 GEMMs: bitsandbytes' CPU 4-bit
    kernel already computes in bf16 there and beats a dense fp32 GEMM, so an fp32 fold would run
    slower than the base it replaces (measured 0.57x); a bf16 copy is about twice as fast as fp32.
    """
    if quant == "nf4" and device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return compute_dtype


class FoldManager:
    def __init__(
        self,
        layers: dict[str, MultiLoraLinear],
        mode: str,
        window: int,
        budget: int,
        dtype: torch.dtype = torch.float32,
    ):
        self.layers = layers
        self.dtype = dtype
        self.mode, self.window, self.budget = mode, window, budget
        self.pinned: set[str] = set()
        self.folded_id: str | None = None
        self.folded_slot: int | None = None
        self.folded_bytes = 0
        self._streak: tuple[str | None, int] = (None, 0)
        self.stats = FoldStats()

    def update(self, adapter_slots: dict[str | None, int]) -> int | None:
        """Args:
        adapter_slots: adapter id -> slot of every sequence in this step's batch (None = base).
        Returns the folded slot to run this step with, or None.
        """
        sole = next(iter(adapter_slots)) if len(adapter_slots) == 1 else None
        owner, streak = self._streak
        self._streak = (sole, streak + 1 if sole == owner else 1)
        if sole is None:
            if self.folded_id is not None and self.folded_id not in self.pinned and adapter_slots:
                self.unfold()
            return None
        slot = adapter_slots[sole]
        if self.folded_id == sole and self.folded_slot == slot:
            return slot
        wanted = self.mode != "off" and (
            sole in self.pinned or (self.mode == "auto" and self._streak[1] >= self.window)
        )
        if not wanted:
            return None
        self.unfold()
        return slot if self.fold(sole, slot) else None

    def fold(self, adapter_id: str, slot: int) -> bool:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        needed = sum(l.out_features * l.in_features * itemsize for l in self.layers.values() if l.slot_rank[slot])
        if needed > self.budget:
            self.stats.over_budget += 1
            return False
        try:
            for layer in self.layers.values():
                if layer.slot_rank[slot]:
                    layer.fold(slot, self.dtype)
        except BaseException:
            for layer in self.layers.values():  # never leave a half-folded model behind
                layer.unfold()
            raise
        self.folded_id, self.folded_slot, self.folded_bytes = adapter_id, slot, needed
        self.stats.folds += 1
        return True

    def unfold(self) -> None:
        if self.folded_id is None:
            return
        for layer in self.layers.values():
            layer.unfold()
        self.folded_id, self.folded_slot, self.folded_bytes = None, None, 0
        self.stats.unfolds += 1

    def on_slot_change(self, slot: int) -> None:
        """The slot's contents changed (evicted, reloaded, forgotten): its fold is stale."""
        if self.folded_slot == slot:
            self.unfold()

    def pin(self, adapter_id: str) -> None:
        self.pinned.add(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.pinned.discard(adapter_id)
        if self.folded_id == adapter_id and self.mode != "auto":
            self.unfold()

    def forget(self, adapter_id: str) -> None:
        """A deleted adapter: drop its pin (its slot's change unfolds it, see `on_slot_change`)."""
        self.pinned.discard(adapter_id)

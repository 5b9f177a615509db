"""Fold: run one adapter's traffic through dense weights `dequant(W0) + s·B·A`, no LoRA overhead.

Before each step the engine tells the `FoldManager` which adapters the batch uses and how many
steps the batch's sequences may still run. An adapter that owns the whole batch is folded when
it is pinned (`fold` "pinned" or "auto") or, with `fold="auto"`, once it has owned every batch
for `fold_window` steps; in both cases only when its remaining work pays for the build (see
`FoldManager.pays`), so a short request over a rotating adapter never starts one.
The dense copies are built between steps in slices of about `slice_bytes`, so no single step
stalls for the whole build (about a second on a CPU for a 135M base): the batch keeps running
unfolded until the last slice is built, then switches in at once. At most one adapter is folded
(or being built) at a time; its dense copies live beside the base layers (the base is never
modified), within `fold_budget` bytes. Traffic for anyone else unfolds an unpinned fold (and
drops an unfinished build) between steps. The dense copies are kept in `dtype` (the engine
picks it: see `fold_dtype`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from server.engine import fused
from server.engine.lora import MultiLoraLinear


@dataclass
class FoldStats:
    folds: int = 0
    unfolds: int = 0
    over_budget: int = 0
    unpaid: int = 0  # folds wanted but not started: the owner's remaining work was too short
    abandoned: int = 0  # builds dropped before their last slice (traffic or slot changed)


@dataclass
class _Build:
    """A fold under construction: the layers still to build, in order."""

    adapter_id: str
    slot: int
    nbytes: int
    todo: list[MultiLoraLinear] = field(default_factory=list)


# Fewest tokens in a step for which a dense bf16 fold beats NF4 projections through the engine's
# kernel plus the LoRA update it saves (default base, every projection, prepacked bf16 against
# fused.nf4_linear: 24.5 vs 11.0 ms at 1 row, 24.1 vs 21.9 at 8, 26.4 vs 26.3 at 12, 26.0 vs 31.3
# at 16; an engine serving one adapter ran 0.66x folded at batch 1 and 1.15-1.39x at batch 16).
NF4_FOLD_MIN_ROWS = 12
# The same with bf16 activations on AMX (fused.nf4_amx_linear): the NF4 projections beat the
# dense bf16 copy up to about 64 rows (kernel_bench: 18.4 vs 24.8 ms at 16, 19.4 vs 36.5 at 32,
# 26.8 vs 24.9 at 64), so a fold waits for that many.
NF4_AMX_FOLD_MIN_ROWS = 64


def fold_min_rows(quant: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """The fewest tokens a step needs to run folded: 1, except for NF4 on a CPU where one of the
    engine's NF4 kernels runs (server/engine/nf4.py: float32 activations, or bf16 on AMX), which
    at small batches is faster than any dense copy (it reads a quarter of bf16's bytes)."""
    if quant != "nf4" or device.type != "cpu":
        return 1
    if compute_dtype == torch.float32 and fused.tile_kernels_available():
        return NF4_FOLD_MIN_ROWS
    if compute_dtype == torch.bfloat16 and fused.amx_available():
        return NF4_AMX_FOLD_MIN_ROWS
    return 1


def fold_dtype(quant: str, device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype of folded dense copies.

    The compute dtype, except for NF4 on a CPU with fast bf16 GEMMs: NF4 projections there (the
    engine's kernel, or bitsandbytes' bf16 one) beat a dense fp32 GEMM, so an fp32 fold would run
    slower than the base it replaces (measured 0.57x against bitsandbytes); a prepacked bf16 copy
    is about twice as fast as fp32, and beats the NF4 kernel from `NF4_FOLD_MIN_ROWS` rows.
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
        slice_bytes: int | None = None,
        min_rows: int = 1,
    ):
        """Args:
        slice_bytes: dense bytes built per step while folding; None builds the whole fold at once.
        min_rows: a step with fewer tokens runs unfolded (see `fold_min_rows`).
        """
        self.layers = layers
        self.dtype = dtype
        self.mode, self.window, self.budget = mode, window, budget
        self.slice_bytes = slice_bytes
        self.min_rows = min_rows
        self.pinned: set[str] = set()
        self.folded_id: str | None = None
        self.folded_slot: int | None = None
        self.folded_bytes = 0
        self.building: _Build | None = None
        self._streak: tuple[str | None, int] = (None, 0)
        self.stats = FoldStats()

    def update(
        self, adapter_slots: dict[str | None, int], remaining_steps: int | None = None, rows: int | None = None
    ) -> int | None:
        """Args:
        adapter_slots: adapter id -> slot of every sequence in this step's batch (None = base).
        remaining_steps: the most steps any sequence of the batch may still run (None = unknown:
            treated as enough).
        rows: the step's tokens (None = unknown: treated as enough). Under `min_rows` the step
            runs unfolded and no build advances; a built fold is kept for when the batch grows.
        Returns the folded slot to run this step with, or None.
        """
        sole = next(iter(adapter_slots)) if len(adapter_slots) == 1 else None
        owner, streak = self._streak
        self._streak = (sole, streak + 1 if sole == owner else 1)
        if sole is None:
            if self.building is not None and self.building.adapter_id not in self.pinned and adapter_slots:
                self._abandon()
            if self.folded_id is not None and self.folded_id not in self.pinned and adapter_slots:
                self.unfold()
            return None
        if rows is not None and rows < self.min_rows:
            return None
        slot = adapter_slots[sole]
        if self.folded_id == sole and self.folded_slot == slot:
            return slot
        build = self.building
        if build is not None and (build.adapter_id, build.slot) == (sole, slot):
            return slot if self._build_slice() else None
        wanted = self.mode != "off" and (
            sole in self.pinned or (self.mode == "auto" and self._streak[1] >= self.window)
        )
        if not wanted:
            return None
        # Judge the new fold before dropping the current one: a candidate whose remaining work
        # cannot pay (or that is over budget) must not cost the adapter already folded its copy.
        if not self._affordable(sole, slot, remaining_steps):
            return None
        self.unfold()
        self._start(sole, slot)
        return slot if self._build_slice() else None

    def pays(self, needed: int, remaining_steps: int | None, pinned: bool) -> bool:
        """Whether the owner's remaining work pays for building `needed` dense bytes.

        The build takes one step per slice and saves nothing until its last slice; a fold is
        worth it only if the owner then still runs folded for as many steps as the build took
        (pinned) or, unpinned, also for `window` more steps, the streak that made it a candidate.
        """
        if remaining_steps is None:
            return True
        slices = 1 if not self.slice_bytes else max(1, math.ceil(needed / self.slice_bytes))
        return remaining_steps >= slices + (0 if pinned else self.window)

    def _needed(self, slot: int) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(l.out_features * l.in_features * itemsize for l in self.layers.values() if l.slot_rank[slot])

    def _affordable(self, adapter_id: str, slot: int, remaining_steps: int | None) -> bool:
        """Within budget and paid for by the owner's remaining work (counted in the stats if not)."""
        needed = self._needed(slot)
        if needed > self.budget:
            self.stats.over_budget += 1
            return False
        if not self.pays(needed, remaining_steps, adapter_id in self.pinned):
            self.stats.unpaid += 1
            return False
        return True

    def _start(self, adapter_id: str, slot: int) -> None:
        todo = [layer for layer in self.layers.values() if layer.slot_rank[slot]]
        self.building = _Build(adapter_id, slot, self._needed(slot), todo)

    def _build_slice(self) -> bool:
        """Build the next slice of the current build; True (and folded) when it is complete."""
        build = self.building
        assert build is not None
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        done = 0
        try:
            while build.todo and (self.slice_bytes is None or done < self.slice_bytes):
                layer = build.todo.pop(0)
                layer.fold(build.slot, self.dtype)
                done += layer.out_features * layer.in_features * itemsize
        except BaseException:
            self._abandon()  # never leave a half-folded model behind
            raise
        if build.todo:
            return False
        self.building = None
        self.folded_id, self.folded_slot, self.folded_bytes = build.adapter_id, build.slot, build.nbytes
        self.stats.folds += 1
        return True

    def fold(self, adapter_id: str, slot: int) -> bool:
        """Fold `adapter_id` (in `slot`) now, whole, regardless of its traffic."""
        self.unfold()
        self._abandon()
        if not self._affordable(adapter_id, slot, None):
            return False
        self._start(adapter_id, slot)
        slice_bytes, self.slice_bytes = self.slice_bytes, None
        try:
            return self._build_slice()
        finally:
            self.slice_bytes = slice_bytes

    def _abandon(self) -> None:
        if self.building is None:
            return
        slot, self.building = self.building.slot, None
        for layer in self.layers.values():
            if layer.folded_slot == slot:
                layer.unfold()
        self.stats.abandoned += 1

    def unfold(self) -> None:
        if self.building is not None:
            self._abandon()
        if self.folded_id is None:
            return
        for layer in self.layers.values():
            layer.unfold()
        self.folded_id, self.folded_slot, self.folded_bytes = None, None, 0
        self.stats.unfolds += 1

    def on_slot_change(self, slot: int) -> None:
        """The slot's contents changed (evicted, reloaded, forgotten): its fold is stale."""
        if self.building is not None and self.building.slot == slot:
            self._abandon()
        if self.folded_slot == slot:
            self.unfold()

    def pin(self, adapter_id: str) -> None:
        self.pinned.add(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self.pinned.discard(adapter_id)
        if self.folded_id == adapter_id and self.mode != "auto":
            self.unfold()
        if self.building is not None and self.building.adapter_id == adapter_id and self.mode != "auto":
            self._abandon()

    def forget(self, adapter_id: str) -> None:
        """A deleted adapter: drop its pin (its slot's change unfolds it, see `on_slot_change`)."""
        self.pinned.discard(adapter_id)


def remaining_steps(batch) -> int:
    """The most decode steps any sequence of `batch` may still run (its max_tokens or context
    left, whichever ends first): how long the batch's owner can keep a fold busy at most."""
    return max(
        (
            min(e.seq.sampling.max_tokens - len(e.seq.output_ids), e.seq.max_model_len - e.seq.num_tokens)
            for e in batch.entries
        ),
        default=0,
    )

"""Packing conversations into micro-batches with no attention across examples.

A micro-batch holds `batch_size` examples. They are packed first-fit-decreasing into rows of
one capacity; each example keeps its own position ids (0, 1, ...) and a block-diagonal causal
mask stops any token from seeing another example, so a packed forward pass equals separate
forward passes. The row capacity is chosen per micro-batch to minimise a simple cost model:
rows x capacity x (per-token projection work + capacity x per-pair attention work), which
weighs padding against the attention a long row spends on masked-out pairs.

Loss targets are listed explicitly (`target_index` into the flattened rows, `targets`,
`target_owner`), so the loss only ever projects supervised positions onto the vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from trainer.data import Example

CAPACITY_STEP = 32  # candidate row capacities are the longest example, then multiples of this


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed examples and their loss targets.

    `input_ids`, `position_ids`, `segment_ids`: (rows, capacity); segment -1 marks padding.
    `target_index`: (num_targets,) flat index into rows*capacity of the position whose hidden
    state predicts `targets` (the next token); `target_owner`: which example (0..n-1, in the
    order given to `pack`) each target belongs to.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    target_index: torch.Tensor
    targets: torch.Tensor
    target_owner: torch.Tensor
    num_examples: int

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int((self.segment_ids >= 0).sum())

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    def attention_mask(self) -> torch.Tensor:
        """Block-diagonal causal mask, (rows, 1, capacity, capacity), True = may attend.

        Padding gets its own segment so every query row attends to at least itself
        (an all-false row would make softmax NaN); padding never reaches the loss.
        """
        length = self.segment_ids.shape[1]
        same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]  # (rows, L, L)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segment_ids.device).tril()
        return (same & causal)[:, None]

    def to(self, device: torch.device | str) -> "PackedBatch":
        fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()}
        return PackedBatch(**fields)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bin indices of `lengths` into rows of `capacity` (each length must fit)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def choose_layout(lengths: list[int], token_cost: float) -> tuple[int, list[list[int]]]:
    """The (capacity, rows) minimising rows * capacity * (token_cost + capacity).

    Args:
        lengths: example lengths.
        token_cost: per-token projection work in units of one attended (query, key) pair.
    """
    longest, total = max(lengths), sum(lengths)
    candidates = [longest] + list(range((longest // CAPACITY_STEP + 1) * CAPACITY_STEP, total, CAPACITY_STEP))
    candidates.append(total)
    best = None
    for capacity in candidates:
        rows = first_fit_decreasing(lengths, capacity)
        used = max(sum(lengths[i] for i in row) for row in rows)  # trim the common tail padding
        cost = len(rows) * used * (token_cost + used)
        if best is None or cost < best[0]:
            best = (cost, used, rows)
    assert best is not None  # `candidates` always holds at least `total`
    return best[1], best[2]


def pack(examples: list[Example], token_cost: float = 3072.0, pad_id: int = 0) -> PackedBatch:
    """Pack `examples` into one micro-batch (see the module docstring)."""
    capacity, rows = choose_layout([len(e) for e in examples], token_cost)
    input_ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long)  # (rows, capacity)
    position_ids = torch.zeros((len(rows), capacity), dtype=torch.long)
    segment_ids = torch.full((len(rows), capacity), -1, dtype=torch.long)
    target_index, targets, owners = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            example = examples[i]
            n = len(example)
            input_ids[r, offset : offset + n] = torch.tensor(example.ids)
            position_ids[r, offset : offset + n] = torch.arange(n)
            segment_ids[r, offset : offset + n] = i
            for t in range(1, n):
                if example.mask[t]:
                    target_index.append(r * capacity + offset + t - 1)  # hidden at t-1 predicts t
                    targets.append(example.ids[t])
                    owners.append(i)
            offset += n
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        segment_ids=segment_ids,
        target_index=torch.tensor(target_index, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        target_owner=torch.tensor(owners, dtype=torch.long),
        num_examples=len(examples),
    )


def micro_batches(
    examples: tuple[Example, ...] | list[Example],
    batch_size: int,
    *,
    token_cost: float = 3072.0,
    pad_id: int = 0,
    shuffle: bool = False,
    seed: int = 0,
) -> list[PackedBatch]:
    """Split `examples` (shuffled with `seed` when asked) into packed micro-batches of `batch_size`."""
    groups = micro_batch_groups(examples, batch_size, shuffle=shuffle, seed=seed)
    return [pack(group, token_cost, pad_id) for group in groups]


def micro_batch_groups(
    examples: tuple[Example, ...] | list[Example], batch_size: int, *, shuffle: bool = False, seed: int = 0
) -> list[list[Example]]:
    """The examples of each micro-batch, unpacked: data-parallel ranks split each group between them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    return [[examples[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]


def token_cost_for(linear_shapes: dict[str, tuple[int, int]]) -> float:
    """Per-token projection MACs of one layer over the MACs one attended pair costs (QK and AV).

    `linear_shapes` is `BaseInfo.linear_shapes`; the attention width is q_proj's output.
    """
    projection = sum(i * o for i, o in linear_shapes.values())
    return projection / (2.0 * linear_shapes["q_proj"][1])

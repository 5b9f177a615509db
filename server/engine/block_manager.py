"""The paged KV cache's bookkeeping: which fixed-size blocks are free and who holds the rest.

A block is `block_size` token positions in every layer's K and V cache. Sequences own ordered
block tables; a block may be shared (reference count > 1), and returns to the free list when
its last holder lets go. This module holds no tensors: the model runner turns block tables into
slot mappings and gather indices.

Every block handed out is recorded as fresh; the runner zeroes fresh blocks before the step that
first writes them, so no sequence ever holds another's stale (possibly non-finite) K/V in the
unwritten tail of a block. Zeroing on allocation costs one small write per block per sequence
lifetime; masking stale values in attention instead would cost a select over every gathered key
and value in every layer of every step.
"""

from __future__ import annotations

from collections import deque

from server.engine.sequence import Sequence


class NoFreeBlocks(RuntimeError):
    """An allocation asked for more blocks than are free (callers check `can_cover` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refcount = [0] * num_blocks
        self._fresh: list[int] = []  # allocated since the last take_fresh(); the runner zeroes them

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks `seq` needs for its cache to hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_cover(self, seq: Sequence, num_tokens: int) -> bool:
        return self.missing_blocks(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` positions (all or nothing)."""
        missing = self.missing_blocks(seq, num_tokens)
        if missing > len(self._free):
            raise NoFreeBlocks(f"need {missing} blocks, {len(self._free)} free")
        for _ in range(missing):
            block = self._free.popleft()
            self._refcount[block] = 1
            seq.block_table.append(block)
            self._fresh.append(block)

    def take_fresh(self) -> list[int]:
        """Blocks allocated since the last call (to be zeroed before they are written)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def share(self, src: Sequence, dst: Sequence) -> None:
        """Let `dst` start with `src`'s blocks (a shared prefix); each gains a reference."""
        for block in src.block_table:
            self._refcount[block] += 1
        dst.block_table = list(src.block_table)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody else holds go back to the free list."""
        for block in reversed(seq.block_table):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                self._free.append(block)
        seq.block_table = []

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def check(self) -> None:
        """Raise AssertionError if a block is both free and held, or counts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        for block, count in enumerate(self._refcount):
            assert count >= 0, f"block {block} has refcount {count}"
            assert (count == 0) == (block in free), f"block {block}: refcount {count}, free={block in free}"

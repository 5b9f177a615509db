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

Prefix caching (see prefix_cache.py for the identities): once a full block's K/V is computed it
is registered under its identity. A sequence admitted later takes the registered blocks of its
longest cached prefix (a reference each, never zeroed again) and starts computing after them. A
registered block nobody holds is not free but *evictable*: it keeps its values and identity in
an LRU until an allocation finds no truly free block and takes it back (fresh: zeroed, identity
dropped). A block is therefore in exactly one of: the free list, the evictable LRU, or held
(refcount > 0); a registered block is never written again, because sequences only write
positions past their own `num_computed` and hits are whole blocks.

The prompt's last block (1..block_size tokens, the *tail*) is usually partial, so it cannot be
shared. While the sequence that computed it holds it, its identity is indexed too, and a sequence
with the same prompt (the other `n` choices) copies its rows into a fresh block of its own
(copy on write: the runner copies the K/V rows before the step) and computes only the last token.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from server.engine.prefix_cache import block_hash, extend_hashes, weights_key
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
        self._cached: dict[bytes, int] = {}  # identity -> the block registered under it
        self._identity: dict[int, bytes] = {}  # the inverse: registered block -> identity
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unheld; oldest first
        self._tails: dict[bytes, tuple[int, int]] = {}  # held prompt tails: identity -> (block, rows)
        self._tail_of: dict[int, bytes] = {}  # the inverse: block -> tail identity
        self._copies: list[tuple[int, int, int]] = []  # (src, dst, rows) since take_copies()
        self.cache_queries = 0  # prompt tokens looked up (monotonic)
        self.cache_hits = 0  # of those, found in the cache (monotonic)

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: truly free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Registered blocks (held or evictable)."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def missing_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks `seq` needs for its cache to hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_cover(self, seq: Sequence, num_tokens: int) -> bool:
        return self.missing_blocks(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` positions (all or nothing)."""
        missing = self.missing_blocks(seq, num_tokens)
        if missing > self.num_free:
            raise NoFreeBlocks(f"need {missing} blocks, {self.num_free} free")
        for _ in range(missing):
            block = self._take()
            self._refcount[block] = 1
            seq.block_table.append(block)
            self._fresh.append(block)

    def _take(self) -> int:
        """A truly free block if any, else the least recently used evictable one (its identity goes)."""
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._cached[self._identity.pop(block)]
        return block

    # -- prefix cache ---------------------------------------------------------------------
    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The identities of `seq`'s first `num_blocks` full blocks (computed once, kept on seq)."""
        assert seq.cache_key is not None
        key = weights_key(seq.cache_key, seq.weights)
        return extend_hashes(seq.block_hashes, num_blocks, self.block_size, seq.token_ids, key)

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks yet the cached blocks of its longest cached prefix.

        Hits are whole blocks and stop before the last token, which is always computed (its
        logits are needed). Sets `num_computed` past the hit; returns the tokens hit."""
        if seq.cache_key is None or seq.block_table or not seq.cache_lookup:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for identity in self.hashes(seq, max_blocks):
            block = self._cached.get(identity)
            if block is None:
                break
            if self._refcount[block] == 0:
                del self._evictable[block]
            self._refcount[block] += 1
            seq.block_table.append(block)
        hit = len(seq.block_table) * self.block_size
        seq.num_registered = len(seq.block_table)
        tail = self._tails.get(self.tail_identity(seq)) if hit == self._tail_start(seq) else None
        if tail is not None and seq.num_tokens == seq.num_prompt_tokens and self.num_free:
            src, rows = tail
            dst = self._take()
            self._refcount[dst] = 1
            seq.block_table.append(dst)
            self._fresh.append(dst)  # zeroed first, then the rows are copied in
            self._copies.append((src, dst, rows))
            hit = seq.num_prompt_tokens - 1  # the last token is computed again: its logits are needed
        seq.num_computed = hit
        return hit

    def _tail_start(self, seq: Sequence) -> int:
        return (seq.num_prompt_tokens - 1) // self.block_size * self.block_size

    def tail_identity(self, seq: Sequence) -> bytes:
        """The identity of `seq`'s prompt tail: its last block, as far as the prompt fills it."""
        assert seq.cache_key is not None
        start = self._tail_start(seq)
        full = start // self.block_size
        parent = self.hashes(seq, full)[-1] if full else None
        key = weights_key(seq.cache_key, seq.weights) + b"\x00tail"
        return block_hash(parent, seq.prompt_ids[start:], key)

    def take_copies(self) -> list[tuple[int, int, int]]:
        """Tail copies (src block, dst block, rows) since the last call, for the runner."""
        copies, self._copies = self._copies, []
        return copies

    def is_cached(self, identity: bytes) -> bool:
        return identity in self._cached

    def has_tail(self, identity: bytes) -> bool:
        return identity in self._tails

    def count_lookup(self, num_prompt_tokens: int, hit: int) -> None:
        """Hit-rate counters, once per request (a readmission after preemption is not counted)."""
        self.cache_queries += num_prompt_tokens
        self.cache_hits += hit

    def pending(self, seq: Sequence) -> list[bytes]:
        """Identities of `seq`'s prompt blocks (and tail) that it computes but has not registered yet."""
        if seq.cache_key is None or seq.num_computed >= seq.num_prompt_tokens:
            return []
        full = min(seq.num_prompt_tokens, seq.cache_limit) // self.block_size
        tail = [self.tail_identity(seq)] if seq.cache_limit >= seq.num_prompt_tokens else []
        return self.hashes(seq, full)[seq.num_registered :] + tail

    def register(self, seq: Sequence) -> None:
        """Enter `seq`'s newly completed full blocks into the cache index.

        Only blocks computed under the weights its identities name (before `cache_limit`); a block
        whose identity is already registered (computed twice) stays private and is freed as usual.
        """
        if seq.cache_key is None:
            return
        if not seq.tail_registered and seq.num_prompt_tokens <= min(seq.num_computed, seq.cache_limit):
            seq.tail_registered = True
            block = seq.block_table[self._tail_start(seq) // self.block_size]
            identity = self.tail_identity(seq)
            if identity not in self._tails and block not in self._tail_of:
                self._tails[identity] = (block, seq.num_prompt_tokens - self._tail_start(seq))
                self._tail_of[block] = identity
        full = min(seq.num_computed, seq.cache_limit) // self.block_size
        if full <= seq.num_registered:
            return
        identities = self.hashes(seq, full)
        for i in range(seq.num_registered, full):
            block = seq.block_table[i]
            if identities[i] not in self._cached and block not in self._identity:
                self._cached[identities[i]] = block
                self._identity[block] = identities[i]
        seq.num_registered = full

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
        """Drop `seq`'s references; blocks nobody else holds go back to the free list, or, when
        registered, to the evictable LRU (the tail first, so a prefix outlives its suffixes)."""
        for block in reversed(seq.block_table):
            self._refcount[block] -= 1
            if self._refcount[block] == 0:
                tail = self._tail_of.pop(block, None)
                if tail is not None:
                    del self._tails[tail]  # a tail is copied only from a block someone holds
                if block in self._identity:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        if self._copies:  # a copy into a block given back before its step ran is dropped
            self._copies = [c for c in self._copies if c[1] not in seq.block_table]
        seq.block_table = []
        seq.num_registered = 0
        seq.tail_registered = False

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def check(self) -> None:
        """Raise AssertionError if a block is both free and held, or the cache index disagrees:
        every block is exactly one of free (no identity), evictable (an identity, unheld) or held."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & set(self._evictable), "a block is both free and evictable"
        for block, count in enumerate(self._refcount):
            assert count >= 0, f"block {block} has refcount {count}"
            idle = block in free or block in self._evictable
            assert (count == 0) == idle, f"block {block}: refcount {count}, free={block in free}"
            assert block not in free or block not in self._identity, f"free block {block} has an identity"
            assert block not in self._evictable or block in self._identity, f"evictable block {block} has none"
        assert len(self._cached) == len(self._identity), "cache index and its inverse differ in size"
        assert len(self._tails) == len(self._tail_of), "tail index and its inverse differ in size"
        for identity, (block, _) in self._tails.items():
            assert self._refcount[block] > 0 and self._tail_of[block] == identity, f"tail block {block} not held"
        for identity, block in self._cached.items():
            assert self._identity.get(block) == identity, f"block {block} is registered under two identities"

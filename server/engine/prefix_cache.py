"""Prefix-cache identities: which KV blocks hold the same values, as a hash chain over full blocks.

A full block's KV depends on every token before it, the weights that computed it and nothing
else, so its identity is `blake2b(parent identity, its token ids, key)` where the key names the
weights and who may share them: the adapter's **content** id (or "base"; a re-upload with new
bytes has a new id, so it never meets the old version's blocks), the weights in effect (folded
dense copies or the LoRA path: they round differently), the scope (the tenant by default, so one
tenant's cache timing tells nothing about another's prompts; "" with the opt-in global scope
for single-tenant deployments) and the request's optional `cache_salt`. A cryptographic hash,
not Python's `hash()`: a collision would hand one prompt another's KV.

The block manager keeps the index (hash -> block) and the evictable LRU; this module only
computes identities and holds no tensors.
"""

from __future__ import annotations

import hashlib
from array import array

SCOPES = ("tenant", "global")
BASE = "base"  # the adapter part of the key for base-model sequences
LORA, FOLDED = "lora", "fold"  # the weights a block was computed under (see server/engine/fold.py)
_DIGEST = 16  # bytes of blake2b output: 128 bits leave collisions out of reach


def cache_key(scope: str, tenant: str, adapter_id: str | None, salt: str | None) -> bytes:
    """The per-request part of every block identity, except the weights in effect (`weights_key`).

    Args:
        scope: "tenant" (blocks shared only within the tenant) or "global".
        tenant: the request's tenant.
        adapter_id: the adapter's content id, None for the base model.
        salt: the request's `cache_salt` (only requests with the same salt share blocks).
    """
    if scope not in SCOPES:
        raise ValueError(f"prefix_cache_scope must be one of {SCOPES}, got {scope!r}")
    parts = (tenant if scope == "tenant" else "", adapter_id or BASE, salt or "")
    # length-prefixed, so no choice of strings can make two different tuples encode the same
    return b"".join(len(p.encode()).to_bytes(4, "little") + p.encode() for p in parts)


def weights_key(key: bytes, weights: str) -> bytes:
    """`key` extended with the weights a sequence computes under (LORA or FOLDED)."""
    return key + b"\x00" + weights.encode()


def block_hash(parent: bytes | None, token_ids: list[int], key: bytes) -> bytes:
    """The identity of one full block given its parent's identity (None for the first block)."""
    h = hashlib.blake2b(digest_size=_DIGEST)
    h.update(parent if parent is not None else b"\x00" * _DIGEST)
    h.update(key)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def extend_hashes(hashes: list[bytes], num_blocks: int, block_size: int, token_ids, key: bytes) -> list[bytes]:
    """Grow `hashes` (in place) to the first `num_blocks` full blocks; `token_ids(start, end)`
    returns the sequence's tokens. Returns `hashes`."""
    while len(hashes) < num_blocks:
        i = len(hashes)
        parent = hashes[-1] if hashes else None
        hashes.append(block_hash(parent, token_ids(i * block_size, (i + 1) * block_size), key))
    return hashes

"""Per-request adapter mixes on an engine replica: which mixes it built, from which parts.

A mix reaches a replica as its id (`mix:<sha256>`, Serve's `multiplexed_model_id`, so requests for
one mix keep their affinity) plus its parts as (content id, weight) pairs, never names or paths.
The replica builds the `MixRef` from its parts' blobs (`EngineReplica._load`); `ReplicaMixes` is
what it remembers of the mixes it holds, so that forgetting a part (its adapter was deleted) also
forgets every mix built from it, as the single-process server does (server/mix.py
`MixChecks.forget_adapter`). Bounded, least recently used first: a tenant sending endless distinct
weights costs the replica at most `kept` records, and a record that falls out is forgotten by the
replica like a deleted part's mix (the next request for it builds it again).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from adapters.mix import MIX_PREFIX, canonical_parts, mix_id

MIXES_KEPT = 1024  # far above what a replica's slots, host cache and Serve's LRU can hold at once

Parts = tuple[tuple[str, float], ...]


def is_mix(content_id: str) -> bool:
    return content_id.startswith(MIX_PREFIX)


class ReplicaMixes:
    """mix id -> its parts, for the mixes this replica was asked to serve (LRU-bounded)."""

    def __init__(self, kept: int = MIXES_KEPT):
        self.kept = kept
        self._parts: OrderedDict[str, Parts] = OrderedDict()

    def declare(self, content_id: str, parts: Sequence[tuple[str, float]]) -> list[str]:
        """Remember that `content_id` is the mix of `parts`; returns the mix ids that fell out.

        Raises:
            ValueError: `parts` do not make `content_id` (a bug at the ingress, never a tenant's
                input: the ingress computes both from the same resolved adapters).
        """
        ordered = tuple(canonical_parts(parts))
        if not ordered or any(is_mix(part) for part, _ in ordered) or mix_id(ordered) != content_id:
            raise ValueError(f"the parts sent with {content_id!r} do not make that mix")
        self._parts[content_id] = ordered
        self._parts.move_to_end(content_id)
        fallen = []
        while len(self._parts) > self.kept:
            fallen.append(self._parts.popitem(last=False)[0])
        return fallen

    def parts(self, content_id: str) -> Parts | None:
        return self._parts.get(content_id)

    def built_from(self, part_id: str) -> list[str]:
        """Forget and return the mixes that have `part_id` among their parts."""
        mixes = [mix for mix, parts in self._parts.items() if any(part == part_id for part, _ in parts)]
        for mix in mixes:
            del self._parts[mix]
        return mixes

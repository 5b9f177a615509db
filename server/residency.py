"""Where each adapter lives right now, read from `engine.stats()` for `/v1/models`, `/v1/adapters`
and `/metrics`.

The engine reports tiers as `stats["adapters"]` = {adapter id: "device" | "host" | "loading" |
"failed"} and fold state as `stats["fold"]` = {"folded": id or None, "pinned": [ids]}. An
adapter the engine does not mention is only on disk (in the store).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DISK = "disk"


@dataclass(frozen=True)
class Residency:
    tier: str = DISK  # device | host | loading | failed | disk
    folded: bool = False
    pinned: bool = False


def adapter_residency(stats: Mapping) -> dict[str, Residency]:
    """adapter id -> Residency, for every adapter the engine knows of."""
    tiers = stats.get("adapters") or {}
    fold = stats.get("fold") or {}
    folded = fold.get("folded")
    pinned = set(fold.get("pinned") or ())
    ids = set(tiers) | pinned | ({folded} if folded else set())
    return {aid: Residency(tiers.get(aid, DISK), aid == folded, aid in pinned) for aid in ids}

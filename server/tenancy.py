"""Per-tenant engine state as one tenant may see and change it: requests, pins, residency.

Identical bytes uploaded by two tenants share one content id (and one blob), so anything keyed by
content alone would leak between them. Everything here is keyed by (tenant, content id):
- `submit` passes the tenant with each request (`engine.add_request(..., tenant=)`);
- `TenantPins.pin/unpin` pass the tenant (`engine.pin(adapter, tenant)`,
  `engine.unpin(adapter_id, tenant)`): one tenant's unpin never removes another's pin;
- `TenantPins.residency(tenant)` is `engine.tenant_residency(tenant)`: only adapters this tenant
  has used or pinned, and `pinned` means this tenant's own pin.

COMPAT (remove once iso-engine's engine is merged): the engine on this branch predates the
issue-9 contract (no `tenant=` anywhere, no `tenant_residency`). For such an engine this module
keeps the per-tenant view itself: pins are reference-counted per content id (the engine is pinned
while any tenant pins, unpinned when the last one unpins), and residency is filtered to the ids
the tenant itself used or pinned. `_accepts_tenant` decides, per engine method, which path runs.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

from server.engine.types import AdapterRef, AdapterResidency


def _accepts_tenant(method) -> bool:
    try:
        return "tenant" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def submit(engine: Any, request_id: str, prompt_ids: list[int], adapter: AdapterRef | None, sampling,
           tenant: str):
    """`engine.add_request` with the tenant (the engine's fair share and per-tenant residency)."""
    if _accepts_tenant(engine.add_request):
        return engine.add_request(request_id, prompt_ids, adapter, sampling, tenant=tenant)
    return engine.add_request(request_id, prompt_ids, adapter, sampling)  # COMPAT: pre-contract engine


class TenantPins:
    """Pins and residency per (tenant, content id), over the engine.

    Args:
        engine: the engine; its `pin`/`unpin`/`tenant_residency` are used as the contract says
            when they take a tenant, else through the compat path described above.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self._pins: dict[str, set[str]] = defaultdict(set)  # adapter id -> tenants pinning it
        self._used: dict[str, set[str]] = defaultdict(set)  # tenant -> ids it used or pinned (compat view)

    def used(self, tenant: str, adapter_id: str) -> None:
        """Remember that `tenant` ran a request on `adapter_id` (its residency becomes visible to it)."""
        self._used[tenant].add(adapter_id)

    def pin(self, tenant: str, adapter: AdapterRef) -> None:
        self._used[tenant].add(adapter.id)
        if _accepts_tenant(self.engine.pin):
            self.engine.pin(adapter, tenant)
        elif not self._pins[adapter.id]:
            self.engine.pin(adapter)  # COMPAT: the first tenant's pin pins the content
        self._pins[adapter.id].add(tenant)

    def unpin(self, tenant: str, adapter_id: str) -> None:
        holders = self._pins.get(adapter_id, set())
        was_pinned = tenant in holders
        holders.discard(tenant)
        if not holders:
            self._pins.pop(adapter_id, None)
        if _accepts_tenant(self.engine.unpin):
            self.engine.unpin(adapter_id, tenant)
        elif was_pinned and not holders:
            self.engine.unpin(adapter_id)  # COMPAT: the last tenant's unpin unpins the content

    def forget(self, tenant: str, adapter_ids: set[str]) -> None:
        """`tenant` deleted these ids: drop its pins and its view of them."""
        for adapter_id in adapter_ids:
            if tenant in self._pins.get(adapter_id, ()):
                self.unpin(tenant, adapter_id)
            self._used[tenant].discard(adapter_id)
        if not self._used[tenant]:
            self._used.pop(tenant, None)

    def residency(self, tenant: str) -> dict[str, AdapterResidency]:
        """adapter id -> what `tenant` may know of it (tier, folded, its own pin)."""
        if hasattr(self.engine, "tenant_residency"):
            return {aid: AdapterResidency(where.tier, where.folded, where.pinned)
                    for aid, where in self.engine.tenant_residency(tenant).items()}
        # COMPAT: filter the operator-wide view to what this tenant used or pinned itself.
        everything = self.engine.stats().residency()
        mine = self._used.get(tenant, set())
        return {aid: AdapterResidency(where.tier, where.folded, tenant in self._pins.get(aid, ()))
                for aid, where in everything.items() if aid in mine}

"""Per-tenant engine state as one tenant may see and change it: requests, pins, residency.

Identical bytes uploaded by two tenants share one content id (and one blob), so anything keyed by
content alone would leak between them. Everything here is keyed by (tenant, content id):
- `submit` passes the tenant with each request (`engine.add_request(..., tenant=)`);
- `TenantPins.pin/unpin` pass the tenant (`engine.pin(adapter, tenant)`,
  `engine.unpin(adapter_id, tenant)`): one tenant's unpin never removes another's pin;
- `TenantPins.residency(tenant)` is `engine.tenant_residency(tenant)`: only adapters this tenant
  has used or pinned, and `pinned` means this tenant's own pin.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from server.engine.types import AdapterRef, AdapterResidency


def submit(engine: Any, request_id: str, prompt_ids: list[int], adapter: AdapterRef | None, sampling, tenant: str):
    """`engine.add_request` with the tenant (the engine's fair share and per-tenant residency)."""
    return engine.add_request(request_id, prompt_ids, adapter, sampling, tenant=tenant)


class TenantPins:
    """Pins and residency per (tenant, content id), over the engine.

    Args:
        engine: the engine; its `pin`/`unpin`/`tenant_residency` take the tenant (the contract).
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self._pins: dict[str, set[str]] = defaultdict(set)  # adapter id -> tenants pinning it

    def pin(self, tenant: str, adapter: AdapterRef) -> None:
        self.engine.pin(adapter, tenant)
        self._pins[adapter.id].add(tenant)

    def unpin(self, tenant: str, adapter_id: str) -> None:
        holders = self._pins.get(adapter_id, set())
        holders.discard(tenant)
        if not holders:
            self._pins.pop(adapter_id, None)
        self.engine.unpin(adapter_id, tenant)

    def forget(self, tenant: str, adapter_ids: set[str]) -> None:
        """`tenant` deleted these ids: drop its pins (the engine drops its view with them)."""
        for adapter_id in adapter_ids:
            if tenant in self._pins.get(adapter_id, ()):
                self.unpin(tenant, adapter_id)

    def residency(self, tenant: str) -> dict[str, AdapterResidency]:
        """adapter id -> what `tenant` may know of it (tier, folded, its own pin)."""
        return dict(self.engine.tenant_residency(tenant))

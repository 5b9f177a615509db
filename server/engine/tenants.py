"""Per-tenant engine state: pins and the adapters each tenant may see as resident.

Keyed by (tenant, content id), never by content alone: two tenants that upload identical bytes
share one adapter id (and one slot), but never a pin and never a view of each other's use. A
tenant sees an adapter's residency only after it used or pinned the adapter itself during the
adapter's current residency (`epoch`, assigned by the slots when the adapter enters memory and
dropped when it leaves). Thread-safe: the HTTP side reads and pins while the loop records uses.
"""

from __future__ import annotations

import threading

from server.engine.types import AdapterResidency


class TenantState:
    def __init__(self):
        self._lock = threading.Lock()
        self._pins: dict[str, set[str]] = {}  # adapter id -> tenants pinning it
        self._seen: dict[str, dict[str, int | None]] = {}  # tenant -> adapter id -> epoch of its use

    def pin(self, tenant: str, adapter_id: str) -> None:
        with self._lock:
            self._pins.setdefault(adapter_id, set()).add(tenant)

    def unpin(self, tenant: str, adapter_id: str) -> None:
        with self._lock:
            tenants = self._pins.get(adapter_id)
            if tenants is not None:
                tenants.discard(tenant)
                if not tenants:
                    del self._pins[adapter_id]

    def pinners(self, adapter_id: str) -> frozenset[str]:
        with self._lock:
            return frozenset(self._pins.get(adapter_id, ()))

    def used(self, tenant: str, adapter_id: str, epoch: int | None) -> None:
        """`tenant` used (or pinned) the adapter during residency `epoch`."""
        with self._lock:
            self._seen.setdefault(tenant, {})[adapter_id] = epoch

    def forget(self, adapter_id: str, tenant: str | None = None) -> None:
        """Drop `tenant`'s pin and view of the adapter (every tenant's view when None)."""
        with self._lock:
            for t, seen in self._seen.items():
                if tenant is None or t == tenant:
                    seen.pop(adapter_id, None)
            if tenant is not None and adapter_id in self._pins:
                self._pins[adapter_id].discard(tenant)
                if not self._pins[adapter_id]:
                    del self._pins[adapter_id]

    def residency(
        self, tenant: str, tiers: dict[str, str], epochs: dict[str, int], folded_id: str | None
    ) -> dict[str, AdapterResidency]:
        """What `tenant` may see: its own uses in the current residency, and its own pins
        ("disk" until the pinned adapter is resident for this tenant)."""
        out: dict[str, AdapterResidency] = {}
        with self._lock:
            seen = self._seen.get(tenant, {})
            for aid, epoch in list(seen.items()):
                tier = tiers.get(aid)
                if tier is None or epoch is None or epochs.get(aid) != epoch:
                    del seen[aid]  # that residency ended (or never began for this tenant)
                    continue
                out[aid] = AdapterResidency(tier, folded=folded_id == aid, pinned=tenant in self._pins.get(aid, ()))
            for aid, tenants in self._pins.items():
                if tenant in tenants and aid not in out:
                    out[aid] = AdapterResidency("disk", folded=False, pinned=True)
        return out

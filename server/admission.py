"""Admission control: who may start a generation now, and which adapters are still in use.

`Admission` bounds requests in flight twice: per tenant (over the limit -> 429) and overall
(running + queued beyond the capacity -> 503), both with `Retry-After`. A `Ticket` is held for
the whole life of a request, streaming included, and released exactly once.

`InFlight` counts requests per adapter id so that a deleted adapter is forgotten by the engine
only after the requests already using it have finished.

Everything here runs on the event loop thread, so plain counters need no locks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from server.errors import Overloaded, RateLimited


class Ticket:
    """A slot in the admission count; `release()` is idempotent."""

    def __init__(self, admission: "Admission", tenant: str):
        self._admission = admission
        self.tenant = tenant
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self.tenant)


class Admission:
    """Per-tenant and global limits on concurrent generation requests.

    Args:
        per_tenant: most requests one tenant may have in flight (429 beyond).
        capacity: most requests in flight overall, running and queued (503 beyond).
        retry_after_s: the `Retry-After` value sent with 429 / 503.
    """

    def __init__(self, per_tenant: int, capacity: int, retry_after_s: int):
        self.per_tenant = per_tenant
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.by_tenant: Counter[str] = Counter()
        self.total = 0
        self.draining = False

    def acquire(self, tenant: str) -> Ticket:
        headers = {"Retry-After": str(self.retry_after_s)}
        if self.draining:
            raise Overloaded("the server is shutting down", headers=headers, code="shutting_down")
        if self.by_tenant[tenant] >= self.per_tenant:
            raise RateLimited(
                f"too many concurrent requests for this API key (limit {self.per_tenant})", headers=headers
            )
        if self.total >= self.capacity:
            raise Overloaded(f"the server queue is full ({self.capacity} requests)", headers=headers)
        self.by_tenant[tenant] += 1
        self.total += 1
        return Ticket(self, tenant)

    def _release(self, tenant: str) -> None:
        self.by_tenant[tenant] -= 1
        if self.by_tenant[tenant] <= 0:
            del self.by_tenant[tenant]
        self.total -= 1

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (or the timeout passes); True if drained."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.total > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        return self.total == 0


class InFlight:
    """Requests in flight per adapter id, with callbacks to run once an id is idle."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._when_idle: dict[str, list[Callable[[], object]]] = {}

    def enter(self, adapter_id: str) -> None:
        self.counts[adapter_id] += 1

    def leave(self, adapter_id: str) -> None:
        self.counts[adapter_id] -= 1
        if self.counts[adapter_id] <= 0:
            del self.counts[adapter_id]
            for callback in self._when_idle.pop(adapter_id, []):
                callback()

    def when_idle(self, adapter_id: str, callback: Callable[[], object]) -> None:
        """Run `callback` now if `adapter_id` has no request in flight, else after the last one."""
        if self.counts[adapter_id] <= 0:
            self.counts.pop(adapter_id, None)
            callback()
        else:
            self._when_idle.setdefault(adapter_id, []).append(callback)

"""Admission control: who may start a generation now, and which adapters are still in use.

`Admission` bounds requests in flight twice: per tenant (over the limit -> 429) and overall
(running + queued beyond the capacity -> 503), both with `Retry-After`. `create_app` caps the
per-tenant limit by the tenant's share of the capacity (`Limits.tenant_queue_share`), so one
tenant can never fill the global queue and lock every other tenant out with 503s. A `Ticket` is
held for the whole life of a request, streaming included, and released exactly once.

`InFlight` counts requests per (tenant, adapter id) — every version, not only the current one —
so that a delete (or a re-upload's pruning) never takes content from under a request that is
still queued on it, and so that garbage collection knows which blobs are in use.

Everything here runs on the event loop thread, so plain counters need no locks.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from functools import partial

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


Key = tuple[str, str]  # (tenant, adapter id)


class InFlight:
    """Users in flight (requests, merges reading sources) per (tenant, adapter id).

    `blobs` maps each adapter id in use to its content's sha256, for garbage collection.
    """

    def __init__(self):
        self.counts: Counter[Key] = Counter()
        self.blobs: dict[str, str] = {}
        self._when_idle: dict[Key, list[Callable[[], object]]] = {}
        self.on_leave: Callable[[], None] = lambda: None  # e.g. schedule a garbage collection

    def enter(self, tenant: str, adapter_id: str, sha256: str | None = None) -> None:
        self.counts[(tenant, adapter_id)] += 1
        if sha256 is not None:
            self.blobs[adapter_id] = sha256

    def leave(self, tenant: str, adapter_id: str) -> None:
        key = (tenant, adapter_id)
        self.counts[key] -= 1
        if self.counts[key] <= 0:
            del self.counts[key]
            if not any(aid == adapter_id for _, aid in self.counts):
                self.blobs.pop(adapter_id, None)
            for callback in self._when_idle.pop(key, []):
                callback()
        self.on_leave()

    def in_use(self) -> set[str]:
        """sha256 of every blob some request or merge still reads."""
        return {self.blobs[aid] for _, aid in self.counts if aid in self.blobs}

    def when_idle(self, key: Key, callback: Callable[[], object]) -> None:
        """Run `callback` now if `key` has no user in flight, else after the last one."""
        if self.counts[key] <= 0:
            self.counts.pop(key, None)
            callback()
        else:
            self._when_idle.setdefault(key, []).append(callback)

    async def idle(self, keys: set[Key]) -> None:
        """Wait until none of `keys` has a user in flight."""
        for key in keys:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.when_idle(key, partial(_resolve, done))
            await done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)

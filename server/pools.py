"""Bounded worker pools and concurrency gates, so no kind of work can starve another.

Rendering/tokenizing, upload staging/validation and merges each run in their own fixed-size
thread pool, apart from Starlette's shared pool (which serves the rest, auth included): a flood of
merges cannot delay an upload's validation, and neither can stall the event loop. A `Gate` bounds
how many of one kind of work are admitted at once, overall (503) and per tenant (429), both with
`Retry-After`, before any of its body is read. Gates run on the event loop thread: plain counters.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial

from server.errors import Overloaded, RateLimited
from server.limits import Limits


class Gate:
    """At most `total` holders overall and `per_tenant` per tenant.

    Args:
        what: the work's name for messages ("uploads").
        total: holders overall (503 beyond).
        per_tenant: holders per tenant (429 beyond).
        retry_after_s: the `Retry-After` value.
    """

    def __init__(self, what: str, total: int, per_tenant: int, retry_after_s: int):
        self.what, self.total, self.per_tenant = what, total, per_tenant
        self.retry_after_s = retry_after_s
        self.by_tenant: Counter[str] = Counter()
        self.held = 0

    @contextmanager
    def hold(self, tenant: str):
        headers = {"Retry-After": str(self.retry_after_s)}
        if self.by_tenant[tenant] >= self.per_tenant:
            raise RateLimited(
                f"too many concurrent {self.what} for this API key (limit {self.per_tenant})", headers=headers
            )
        if self.held >= self.total:
            raise Overloaded(f"too many concurrent {self.what} on the server (limit {self.total})", headers=headers)
        self.by_tenant[tenant] += 1
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1
            self.by_tenant[tenant] -= 1
            if self.by_tenant[tenant] <= 0:
                del self.by_tenant[tenant]


class WorkerPools:
    """The app's pools (`render`, `upload`, `merge`) and the gates in front of uploads and merges."""

    def __init__(self, limits: Limits, retry_after_s: int):
        self.render = ThreadPoolExecutor(limits.render_threads, thread_name_prefix="loraswap-render")
        self.upload = ThreadPoolExecutor(limits.max_concurrent_uploads, thread_name_prefix="loraswap-upload")
        self.merge = ThreadPoolExecutor(limits.max_concurrent_merges, thread_name_prefix="loraswap-merge")
        # The store's own chores (garbage collection, deletes): one thread, never a request's.
        self.store = ThreadPoolExecutor(1, thread_name_prefix="loraswap-store")
        self.uploads = Gate(
            "uploads", limits.max_concurrent_uploads, limits.max_concurrent_uploads_per_tenant, retry_after_s
        )
        # A merge is one tenant's CPU-heavy job: per tenant, one at a time.
        self.merges = Gate("merges", limits.max_concurrent_merges, 1, retry_after_s)

    async def run(self, pool: ThreadPoolExecutor, fn, /, *args, **kwargs):
        """`fn(*args, **kwargs)` in `pool`, awaited from the event loop."""
        return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        for pool in (self.render, self.upload, self.merge, self.store):
            pool.shutdown(wait=False, cancel_futures=True)

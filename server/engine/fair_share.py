"""Fairness across tenants for the scheduler: round-robin admission and a per-tenant slot share.

Tenants are mutually hostile, so neither arrival order nor the number of adapters one tenant
uses may decide who runs. `round_robin` orders the waiting queue by alternating tenants (FIFO
within each tenant, starting after the tenant served last), so a burst from one tenant cannot
starve another. `SlotShare` refuses a tenant one more adapter slot while it already holds
`ceil(max_loras / tenants waiting or running)` and another tenant waits for a slot. Running
sequences are never preempted for fairness: a tenant's excess slots return as its sequences end.
Pure functions over sequences; no tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from math import ceil

from server.engine.sequence import Sequence


def round_robin(waiting: Iterable[Sequence], last_tenant: str | None) -> Iterator[Sequence]:
    """Waiting sequences interleaved by tenant: one of each tenant in turn, FIFO within a tenant.

    Tenants take turns in order of their oldest waiting sequence, starting with the first tenant
    after `last_tenant` in that order (the one served last goes to the back).
    """
    queues: dict[str, list[Sequence]] = {}
    for seq in waiting:
        queues.setdefault(seq.tenant, []).append(seq)
    if len(queues) <= 1:
        yield from (q for qs in queues.values() for q in qs)
        return
    tenants = list(queues)
    if last_tenant in queues:
        i = tenants.index(last_tenant) + 1
        tenants = tenants[i:] + tenants[:i]
    depth = 0
    while True:
        emitted = False
        for tenant in tenants:
            if depth < len(queues[tenant]):
                emitted = True
                yield queues[tenant][depth]
        if not emitted:
            return
        depth += 1


class SlotShare:
    """One step's view of who holds which adapter slots, built once per admission pass.

    `allows(seq)`: whether `seq` may take an adapter slot its tenant does not already hold. The
    base (no adapter) and an adapter the tenant already runs need no new slot. Otherwise, while
    another tenant waits for an adapter, the tenant gets a new slot only below its share
    `ceil(max_loras / number of tenants waiting or running)`.
    """

    def __init__(self, running: Iterable[Sequence], waiting: Iterable[Sequence], max_loras: int | None):
        self.max_loras = max_loras
        self.held: dict[str, set[str]] = {}
        tenants: set[str] = set()
        for s in running:
            tenants.add(s.tenant)
            if s.adapter is not None:
                self.held.setdefault(s.tenant, set()).add(s.adapter.id)
        self.wanting: dict[str, int] = {}  # tenant -> waiting sequences that need an adapter
        for s in waiting:
            tenants.add(s.tenant)
            if s.adapter is not None:
                self.wanting[s.tenant] = self.wanting.get(s.tenant, 0) + 1
        self.share = ceil(max_loras / max(1, len(tenants))) if max_loras is not None else 0

    def allows(self, seq: Sequence) -> bool:
        if self.max_loras is None or seq.adapter is None:
            return True
        held = self.held.get(seq.tenant, ())
        if seq.adapter_id in held:
            return True
        others_wait = any(n for t, n in self.wanting.items() if t != seq.tenant)
        return not others_wait or len(held) < self.share

    def admitted(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.held.setdefault(seq.tenant, set()).add(seq.adapter.id)
            self.wanting[seq.tenant] -= 1

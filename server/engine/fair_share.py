"""Fairness across tenants for the scheduler: round-robin admission and a per-tenant slot share.

Tenants are mutually hostile, so neither arrival order nor the number of adapters one tenant
uses may decide who runs. `round_robin` orders the waiting queue by alternating tenants (FIFO
within each tenant, starting after the tenant served last), so a burst from one tenant cannot
starve another. `SlotShare` refuses a tenant one more adapter slot while it already holds
`ceil(max_loras / tenants waiting or running)` and another tenant waits for a slot.
`slot_victims` handles what admission alone cannot: a tenant that took every slot before anyone
else came. When another tenant's adapter is ready but every slot is pinned, the tenant holding
the most slots (at least two more than the one waiting) gives one back: its running sequences on
one adapter are preempted by recompute, so their output is unchanged, only later.
Pure functions over sequences; no tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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


def slot_victims(
    running: Iterable[Sequence],
    waiting: Iterable[Sequence],
    max_loras: int | None,
    waits_for_slot: Callable[[Sequence], bool],
) -> list[Sequence]:
    """Running sequences to preempt so that one tenant starved of adapter slots gets one.

    A waiting sequence is starved when its adapter is ready (`waits_for_slot`: loaded, but every
    device slot is pinned) and its tenant may take a new slot (`SlotShare.allows`). The victim is
    the tenant holding the most slots, and only when it holds at least two more than the starved
    tenant: moving one slot then narrows the gap and can never make the two swap back (no
    thrashing). Of the victim's adapters, one that no other tenant runs (same content) and with
    the fewest running sequences (least work to recompute) gives its slot back. At most one
    adapter per call, so the scheduler rebalances one slot per step.
    """
    running = list(running)
    waiting = list(waiting)
    if max_loras is None or not waiting:
        return []
    held: dict[str, set[str]] = {}  # tenant -> adapter ids its running sequences pin
    users: dict[str, list[Sequence]] = {}  # adapter id -> running sequences on it
    for s in running:
        if s.adapter is not None:
            held.setdefault(s.tenant, set()).add(s.adapter.id)
            users.setdefault(s.adapter.id, []).append(s)
    share = SlotShare(running, waiting, max_loras)
    for seq in waiting:
        if seq.adapter is None or seq.adapter.id in users or not share.allows(seq):
            continue
        starved = len(held.get(seq.tenant, ()))
        richest = sorted(
            (t for t in held if t != seq.tenant and len(held[t]) > starved + 1),
            key=lambda t: (-len(held[t]), t),
        )
        if not richest or not waits_for_slot(seq):
            continue
        victim = richest[0]
        own = [aid for aid in held[victim] if all(s.tenant == victim for s in users[aid])]
        if not own:
            continue
        # the least computed work goes back: a newcomer's short request must not cost the
        # victim a long recompute when a cheaper one frees a slot just as well
        aid = min(own, key=lambda a: (sum(s.num_computed for s in users[a]), -max(s.seq_id for s in users[a])))
        return users[aid]
    return []

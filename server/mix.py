"""Which model a generation request targets: the base, one adapter, or a mix of the caller's adapters.

A request may set the extension field `"adapters": [{"name": "a", "weight": 0.7}, ...]` with
`model` = the base id; the engine then serves `sum_k w_k * s_k * B_k A_k` as one composed adapter
(`MixRef`, built in the loader thread; adapters/mix.py). Checks, cheapest first: `model` is the
base; count and weights within `--limits.max-mix-adapters` / `--limits.max-mix-weight`; no name
twice (400 `adapters`); every name is the caller's own (404, exactly as a name that does not
exist); the adapters agree on their chat template; then, once per (tenant, mix) and off the
event loop in the merge pool behind the merge gate: the mix's rank (the sum of its adapters'
ranks per module) within `max_rank` (400 `adapters`) and the composed adapter within the upload
bounds (adapters/bounds.py, 422), so a mix cannot serve what an upload could not.

Chat and legacy completions share this: `resolve_request` before rendering, `resolve_again` after
the last await (the adapters may have been deleted or re-uploaded meanwhile). With the local store
`resolve_again` never suspends; with the cluster's store its lookups are awaited, and a DELETE
begun meanwhile still answers 404 (`ServerState.is_deleting`), as for one adapter.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Protocol

from adapters.bounds import AdapterBounds, check_bounds
from adapters.errors import AdapterNotFound, AdapterOutOfRange, InvalidName
from adapters.format import read_peft
from adapters.mix import compose_mix, mix_ranks
from server.engine.mixes import make_mix_ref
from server.engine.types import AdapterRef, MixRef
from server.errors import BadRequest, Conflict
from server.state import ResolvedModel, ServerState

VERDICTS_KEPT = 1024  # (tenant, mix id) pairs remembered as checked


class MixPart(Protocol):
    """One entry of a request's `adapters` (server/api/protocol.py `MixComponent`)."""

    name: str
    weight: float


class MixChecks:
    """The (tenant, mix id) pairs whose rank and bounds were checked (LRU-bounded), with the
    content ids of each mix's adapters (so a deleted adapter's mixes leave the engine with it).

    Keyed by tenant too: identical bytes uploaded by two tenants make the same mix id, and a
    verdict one tenant's request left must not make another's measurably faster.
    """

    def __init__(self, kept: int = VERDICTS_KEPT):
        self.kept = kept
        self._passed: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()

    def passed(self, tenant: str, mix_id: str) -> bool:
        key = (tenant, mix_id)
        if key in self._passed:
            self._passed.move_to_end(key)
            return True
        return False

    def record(self, tenant: str, mix_id: str, adapter_ids: frozenset[str]) -> None:
        self._passed[(tenant, mix_id)] = adapter_ids
        while len(self._passed) > self.kept:
            self._passed.popitem(last=False)

    def forget_adapter(self, adapter_id: str) -> set[str]:
        """Drop the verdicts of mixes made with `adapter_id`; returns those mix ids."""
        keys = [key for key, adapter_ids in self._passed.items() if adapter_id in adapter_ids]
        for key in keys:
            del self._passed[key]
        return {mix_id for _, mix_id in keys}


def checks(state: ServerState) -> MixChecks:
    if state.mixes is None:
        state.mixes = MixChecks()
    return state.mixes


async def resolve_request(
    state: ServerState, tenant: str, model: str, adapters: Sequence[MixPart] | None
) -> ResolvedModel:
    """`model` (and `adapters`, when given) -> what the engine runs; every refusal is an HTTP error.

    Raises:
        BadRequest: 400 `adapters` (model not the base, count, weight, repeated name, rank, templates).
        AdapterNotFound: 404 `model_not_found` for a name the caller does not own.
        AdapterOutOfRange: 422 when the composed adapter is out of the upload bounds.
    """
    if adapters is None:
        return await state.aresolve_model(tenant, model)
    resolved = await _lookup(state, tenant, model, adapters)
    mix_id = resolved.adapter.id if resolved.adapter is not None else ""
    if not checks(state).passed(tenant, mix_id):
        await _check_off_loop(state, tenant, resolved)
        checks(state).record(tenant, mix_id, frozenset(record.id for record in resolved.components))
    return resolved


async def resolve_again(
    state: ServerState,
    tenant: str,
    model: str,
    adapters: Sequence[MixPart] | None,
    first: ResolvedModel,
) -> ResolvedModel:
    """The same resolution right before admission (with the local store, without suspending): 404
    if an adapter is gone, 409 if one was re-uploaded with other content since `first` was checked."""
    if adapters is None:
        return await state.aresolve_model(tenant, model)
    resolved = await _lookup(state, tenant, model, adapters)
    if first.adapter is None or resolved.adapter is None or resolved.adapter.id != first.adapter.id:
        raise Conflict("an adapter of the mix changed while the request was prepared; retry", param="adapters")
    return resolved


async def _lookup(state: ServerState, tenant: str, model: str, adapters: Sequence[MixPart]) -> ResolvedModel:
    """The cheap checks and the store lookups (no I/O beyond the store's index).

    The local store answers inline (nothing here suspends); a store elsewhere (the cluster's
    `RemoteStore`) is awaited, never waited on, so the event loop serves other tenants meanwhile.
    """
    limits = state.config.limits
    if model != state.base_id:
        # The same answer whether `model` names an adapter, another tenant's or nothing at all.
        raise BadRequest(f"with 'adapters', 'model' must be the base model '{state.base_id}'", param="adapters")
    if not 1 <= len(adapters) <= limits.max_mix_adapters:
        raise BadRequest(
            f"'adapters' must list 1 to {limits.max_mix_adapters} adapters, got {len(adapters)}", param="adapters"
        )
    for component in adapters:
        if not (math.isfinite(component.weight) and abs(component.weight) <= limits.max_mix_weight):
            raise BadRequest(
                f"the weight of '{component.name}' must be a finite number in "
                f"[-{limits.max_mix_weight:g}, {limits.max_mix_weight:g}], got {component.weight!r}",
                param="adapters",
            )
    names = [component.name for component in adapters]
    if len(set(names)) != len(names):
        raise BadRequest("'adapters' names an adapter more than once", param="adapters")
    records = []
    for component in adapters:
        try:
            records.append(await state.aget_adapter(tenant, component.name))
        except (AdapterNotFound, InvalidName):
            raise AdapterNotFound(component.name, param="adapters") from None
    templates = {record.template_sha256 for record in records} - {None}
    if len(templates) > 1:
        raise BadRequest("the adapters of a mix were trained with different chat templates", param="adapters")
    paths = [await state.aadapter_dir(record) for record in records]
    for component in adapters:
        if state.is_deleting(tenant, component.name):  # a DELETE began while we awaited the store
            raise AdapterNotFound(component.name, param="adapters")
    ref = make_mix_ref(
        [
            (AdapterRef(id=record.id, path=path), component.weight)
            for record, path, component in zip(records, paths, adapters)
        ]
    )
    return ResolvedModel(model, ref, None, tuple(records))


async def _check_off_loop(state: ServerState, tenant: str, resolved: ResolvedModel) -> None:
    """Rank and bounds of the composed mix, in the merge pool behind the merge gate (a mix's
    check costs what a small merge does: reading its adapters)."""
    for adapter_id, sha256 in resolved.in_use():  # a DELETE waits; collection skips these blobs
        state.inflight.enter(tenant, adapter_id, sha256)
    try:
        with state.pools.merges.hold(tenant):
            await state.pools.run(state.pools.merge, check_mix, state, resolved)
    finally:
        for adapter_id, _ in resolved.in_use():
            state.inflight.leave(tenant, adapter_id)


def check_mix(state: ServerState, resolved: ResolvedModel) -> None:
    """Blocking: read the adapters, refuse a mix over `max_rank` (400) or out of the bounds (422)."""
    if not isinstance(resolved.adapter, MixRef):
        raise TypeError("check_mix needs a resolved mix")  # a bug, not a request's fault
    by_id = {record.id: record for record in resolved.components}
    # the mix's canonical order: the order the engine concatenates its ranks in
    records = [by_id[part.id] for part, _ in resolved.adapter.parts]
    weights = [weight for _, weight in resolved.adapter.parts]
    with ExitStack() as held:
        for record in records:
            held.enter_context(state.store.hold(record))  # pruning meanwhile keeps the blob
        components = [read_peft(state.store.adapter_dir(record)) for record in records]
    max_rank = state.config.max_rank
    path, rank = max(mix_ranks(components).items(), key=lambda item: item[1], default=("", 0))
    if rank > max_rank:
        raise BadRequest(
            f"the mix needs rank {rank} at {path} (the sum of its adapters' ranks), above max_rank={max_rank}",
            param="adapters",
        )
    mixed = compose_mix(list(zip(components, weights)))
    try:
        check_bounds(mixed, state.base_info.weight_norms(), AdapterBounds())
    except AdapterOutOfRange as exc:
        raise AdapterOutOfRange(f"the mix is out of range: {exc}", param="adapters") from None

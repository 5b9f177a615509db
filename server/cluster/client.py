"""`ReplicaEngineClient`: the ingress's engine, mirroring the `Engine` methods the app calls.

`add_request` / `abort` / `pin` / `unpin` / `forget_adapter` / `stats` / `tokenizer` /
`max_model_len` / `start` / `stop` behave as the in-process engine's do, but each request runs on an
`EngineReplica` that Ray Serve picks: `multiplexed_model_id` = the adapter's content id, empty for
the base; `router.AdapterRouter` picks the replica. A per-request mix is sent as its mix id (so
its requests keep their affinity) with its parts' content ids and weights, from which the replica
builds it (server/cluster/mixes.py). A compiled grammar (structured output, tool calls) cannot
cross processes: its spec and end-of-turn ids travel instead and the replica compiles it again
(`sendable`).

Failure: if a replica dies before the request produced a token, the request is sent again to
another replica (`retries` times, default once). Otherwise the request ends with finish_reason
"abort" and a 503 `replica_lost` error (retryable, `Retry-After`): the error response when it was
not streaming, an error event in SSE. Errors a replica raised on purpose keep their status (a
deleted adapter's 404); anything else is a 500. Which replica served each request is kept for the
response header (see `ingress.ReplicaHeader`). `forget_adapter` reaches every replica (Serve's
`broadcast`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any

from adapters.errors import LoraswapError
from server.cluster.errors import LOST, replica_lost, unwrap
from server.engine.grammar import CompiledGrammar, GrammarSpec
from server.engine.types import AdapterRef, AdapterResidency, EngineStats, FoldView, MixRef, SamplingParams, TokenEvent

log = logging.getLogger("loraswap.cluster")
# Set by the ingress middleware for each HTTP request; the client writes the replica's name into it.
current_replica: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loraswap_replica", default=None)


_TIER_RANK = {"device": 0, "loading": 1, "host": 2, "failed": 3}
_COUNTERS = [f.name for f in dataclasses.fields(EngineStats) if f.type in ("int", int)]


def as_stats(reported: Any) -> EngineStats:
    """A replica's report as `EngineStats` (replicas send the dataclass; a dict is accepted too)."""
    if isinstance(reported, EngineStats):
        return reported
    values = {k: v for k, v in dict(reported or {}).items() if k in {f.name for f in dataclasses.fields(EngineStats)}}
    if isinstance(values.get("fold"), dict):
        values["fold"] = FoldView(**{**values["fold"], "pinned": tuple(values["fold"].get("pinned", ()))})
    return EngineStats(**values)


def merge_stats(reports: Iterable[EngineStats]) -> EngineStats:
    """One snapshot over the replicas: counters summed, each adapter at its best tier anywhere,
    slots numbered on (replica after replica), pins united, the first folded adapter as folded."""
    counters = dict.fromkeys(_COUNTERS, 0)
    adapters: dict[str, str] = {}
    slots: dict[int, str | None] = {}
    folded: str | None = None
    pinned: set[str] = set()
    fold_bytes = folds = unfolds = 0
    for stats in reports:
        for key in _COUNTERS:
            counters[key] += int(getattr(stats, key))
        for adapter_id, tier in stats.adapters.items():
            best = adapters.get(adapter_id)
            if best is None or _TIER_RANK.get(tier, 9) < _TIER_RANK.get(best, 9):
                adapters[adapter_id] = tier
        for slot in sorted(stats.slots):
            slots[len(slots) + 1] = stats.slots[slot]
        folded = folded or stats.fold.folded
        pinned.update(stats.fold.pinned)
        fold_bytes += stats.fold.bytes
        folds += stats.fold.folds
        unfolds += stats.fold.unfolds
    fold = FoldView(folded=folded, pinned=tuple(sorted(pinned)), bytes=fold_bytes, folds=folds, unfolds=unfolds)
    return EngineStats(adapters=adapters, slots=slots, fold=fold, **counters)


def mix_parts(adapter: AdapterRef | None) -> tuple[tuple[str, float], ...]:
    """What a replica needs to build a mix: its parts' content ids and weights (no names, no paths)."""
    if not isinstance(adapter, MixRef):
        return ()
    return tuple((part.id, weight) for part, weight in adapter.parts)


def sendable(sampling: SamplingParams) -> tuple[SamplingParams, tuple[GrammarSpec, tuple[int, ...]] | None]:
    """`sampling` without its compiled grammar (llguidance's matcher does not pickle), and what the
    replica compiles it from: the spec the ingress checked and the end-of-turn ids it allows."""
    grammar = sampling.grammar
    if not isinstance(grammar, CompiledGrammar):
        return sampling, None
    return dataclasses.replace(sampling, grammar=None), (grammar.spec, tuple(grammar.end_ids))


class ReplicaEngineClient:
    """The ingress's `EngineClient` (server/engine/types.py) over the `EngineReplica` deployment.

    Tenancy: the tenant travels with each request and pin to the replica; which adapters a tenant
    used or pinned (its `tenant_residency`) is kept here, where every request passes.

    Args:
        handle: the `EngineReplica` deployment handle.
        tokenizer: the base's tokenizer (the ingress renders prompts itself).
        max_model_len: the engines' model length (the config's, capped by the base).
        retries: how many times a request that produced nothing is resent after losing its replica.
    """

    tokenizer: Any
    max_model_len: int

    def __init__(self, handle, tokenizer, max_model_len: int, retries: int = 1):
        self.handle = handle
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.retries = retries
        self._responses: dict[str, Any] = {}  # request id -> its Serve response (cancel() aborts it)
        self._stats: dict[str, EngineStats] = {}  # replica -> its last reported engine stats
        self._used: dict[str, set[str]] = defaultdict(set)  # tenant -> adapter ids it ran or pinned
        self._pins: dict[str, set[str]] = defaultdict(set)  # adapter id -> tenants pinning it
        self._commands: set[asyncio.Task] = set()  # fire-and-forget replica commands still running

    @property
    def replicas(self) -> list[str]:
        """The replicas that reported so far."""
        return sorted(self._stats)

    async def start(self) -> None:
        """Wait until one replica answers (so `/ready` means a healthy replica exists)."""
        reply = await self.handle.ready.remote()
        self._stats[reply["replica"]] = as_stats(reply["stats"])

    async def stop(self) -> None:
        for response in list(self._responses.values()):
            response.cancel()

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: AdapterRef | None,
        sampling: SamplingParams,
        tenant: str = "default",
    ) -> AsyncIterator[TokenEvent]:
        if adapter is not None and not isinstance(adapter, MixRef):
            # a mix is no adapter of the tenant's (never listed), and its ids are unbounded in number
            self._used[tenant].add(adapter.id)
        return self._stream(request_id, prompt_ids, adapter, sampling, tenant)

    async def _stream(
        self, request_id: str, prompt_ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams, tenant: str
    ) -> AsyncIterator[TokenEvent]:
        holder = current_replica.get()
        sent = 0
        lost: list[str] = []  # replicas lost before this request produced anything: not asked again
        options = {"stream": True, "multiplexed_model_id": adapter.id if adapter is not None else ""}
        mix = mix_parts(adapter)
        sampling, grammar = sendable(sampling)
        while True:
            response = self.handle.options(**options).generate.remote(
                request_id, prompt_ids, sampling, tenant, avoid=tuple(lost), mix=mix, grammar=grammar
            )
            self._responses[request_id] = response
            serving = ""
            try:
                async for replica, event, stats in response:
                    serving = replica
                    if event is None:  # the replica's first word: it has the request
                        continue
                    if holder is not None:
                        holder["replica"] = replica
                    if stats is not None:
                        self._stats[replica] = as_stats(stats)
                    sent += 1
                    yield event
                return
            except Exception as exc:
                if replica_lost(exc) and sent == 0 and len(lost) < self.retries:
                    log.warning("request %s lost replica %s before any token; resending", request_id, serving)
                    lost.append(serving)
                    continue
                yield self._failed(request_id, exc)
                return
            finally:
                self._responses.pop(request_id, None)

    @staticmethod
    def _failed(request_id: str, exc: Exception) -> TokenEvent:
        """The last event of a request its replica could not finish, with the status to answer.

        An event rather than an exception: a stream has started by the time the replica's answer
        arrives; a non-streaming request turns it into the same error response (api/abort.py).
        """
        if replica_lost(exc):
            error, code, status = LOST, "replica_lost", 503
        else:
            cause = unwrap(exc)
            if not isinstance(cause, LoraswapError):
                log.error("request %s failed on its replica", request_id, exc_info=exc)
                cause = LoraswapError("the engine replica failed", code="engine_error", status=500)
            error, code, status = str(cause), cause.code or "engine_error", cause.status
        return TokenEvent(
            request_id, None, "", finish_reason="abort", error=error, error_code=code, error_status=status
        )

    def abort(self, request_id: str) -> None:
        response = self._responses.pop(request_id, None)
        if response is not None:
            response.cancel()  # the replica's generator is cancelled, which aborts the engine request

    def pin(self, adapter: AdapterRef, tenant: str = "default") -> None:
        self._used[tenant].add(adapter.id)
        self._pins[adapter.id].add(tenant)
        self._fire(self.handle.options(multiplexed_model_id=adapter.id).pin.remote(adapter.id, tenant))

    def unpin(self, adapter_id: str, tenant: str = "default") -> None:
        holders = self._pins.get(adapter_id, set())
        holders.discard(tenant)
        if not holders:
            self._pins.pop(adapter_id, None)
        self._fire(self.handle.options(multiplexed_model_id=adapter_id).unpin.remote(adapter_id, tenant))

    def forget_adapter(self, adapter_id: str, tenant: str | None = None) -> None:
        """Every replica drops the content (engine slots and host cache, its local blob copy).

        Names resolve through the store before routing, so a deleted name is never sent to a
        replica after its DELETE answered; this frees the memory everywhere and makes a replica
        refuse the content id itself from then on (`EngineReplica.forget_adapter`).
        """
        self._pins.pop(adapter_id, None)
        for used in self._used.values():
            used.discard(adapter_id)
        self._fire(self.broadcast("forget_adapter", adapter_id))

    async def broadcast(self, method: str, *args) -> list:
        """`method(*args)` on every running replica; a replica lost meanwhile is logged and skipped."""
        results = await self.handle.broadcast(method, *args).results_async(return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("replica %s failed: %s", method, result)
        return [result for result in results if not isinstance(result, Exception)]

    def _fire(self, awaitable) -> None:
        async def wait():
            try:
                await awaitable
            except Exception as exc:  # a lost replica loses its pins and caches with it
                log.warning("replica command failed: %s", exc)

        task = asyncio.ensure_future(wait())
        self._commands.add(task)  # held until done, so the loop does not drop it
        task.add_done_callback(self._commands.discard)

    def stats(self) -> EngineStats:
        """The replicas' last reports merged (see `merge_stats`); each replica reports with every
        finished request and on `ready`, so an idle replica's numbers may be older."""
        return merge_stats(self._stats[name] for name in sorted(self._stats))

    def tenant_residency(self, tenant: str) -> dict[str, AdapterResidency]:
        """Only adapters `tenant` ran or pinned through this ingress; `pinned` is its own pin."""
        everything = self.stats().residency()
        mine = self._used.get(tenant, set())
        return {
            aid: AdapterResidency(where.tier, where.folded, tenant in self._pins.get(aid, ()))
            for aid, where in everything.items()
            if aid in mine
        }

    def close(self) -> None:
        pass

"""`ReplicaEngineClient`: the ingress's engine, mirroring the `Engine` methods the app calls.

`add_request` / `abort` / `pin` / `unpin` / `forget_adapter` / `stats` / `tokenizer` /
`max_model_len` / `start` / `stop` behave as the in-process engine's do, but each request runs on an
`EngineReplica` that Ray Serve picks: `multiplexed_model_id` = the adapter's content id, empty for
the base (Serve's power-of-two-choices over queue lengths, i.e. the less loaded of two replicas).

Failure: if a replica dies before the request produced a token, the request is sent again (once per
replica lost, up to `retries`); after a token was sent, the stream ends with finish_reason "abort"
and an error that says the replica was lost. Which replica served each request is kept for the
response header (see `ingress.ReplicaHeader`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator

from server.engine.errors import EngineStopped
from server.engine.types import AdapterRef, SamplingParams, TokenEvent

log = logging.getLogger("loraswap.cluster")
# Set by the ingress middleware for each HTTP request; the client writes the replica's name into it.
current_replica: contextvars.ContextVar[dict | None] = contextvars.ContextVar("loraswap_replica", default=None)

LOST = "the engine replica serving this request was lost; retry the request"


def _replica_lost(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


class ReplicaEngineClient:
    """Args:
        handle: the `EngineReplica` deployment handle.
        tokenizer: the base's tokenizer (the ingress renders prompts itself).
        max_model_len: the engines' model length (the config's, capped by the base).
        retries: how many times a request that produced nothing is resent after losing its replica.
    """

    def __init__(self, handle, tokenizer, max_model_len: int, retries: int = 2):
        self.handle = handle
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.retries = retries
        self._responses: dict[str, object] = {}
        self._stats: dict[str, dict] = {}  # replica -> its last reported engine stats

    async def start(self) -> None:
        """Wait until one replica answers (so `/ready` means a healthy replica exists)."""
        reply = await self.handle.ready.remote()
        self._stats[reply["replica"]] = reply["stats"]

    async def stop(self) -> None:
        for response in list(self._responses.values()):
            response.cancel()

    def add_request(self, request_id: str, prompt_ids: list[int], adapter: AdapterRef | None,
                    sampling: SamplingParams) -> AsyncIterator[TokenEvent]:
        return self._stream(request_id, prompt_ids, adapter, sampling)

    async def _stream(self, request_id, prompt_ids, adapter, sampling) -> AsyncIterator[TokenEvent]:
        holder = current_replica.get()
        sent, attempt = 0, 0
        options = {"stream": True, "multiplexed_model_id": adapter.id if adapter is not None else ""}
        while True:
            response = self.handle.options(**options).generate.remote(request_id, prompt_ids, sampling)
            self._responses[request_id] = response
            try:
                async for replica, event, stats in response:
                    if holder is not None:
                        holder["replica"] = replica
                    if stats is not None:
                        self._stats[replica] = stats
                    sent += 1
                    yield event
                return
            except Exception as exc:
                if not _replica_lost(exc):
                    raise
                attempt += 1
                if sent == 0 and attempt <= self.retries:
                    log.warning("request %s lost its replica before any token; resending", request_id)
                    continue
                if sent == 0:  # nothing was relayed: the caller answers 503 before any response starts
                    raise EngineStopped(LOST) from exc
                yield TokenEvent(request_id, None, "", finish_reason="abort", error=LOST)
                return
            finally:
                self._responses.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        response = self._responses.pop(request_id, None)
        if response is not None:
            response.cancel()  # the replica's generator is cancelled, which aborts the engine request

    def pin(self, adapter: AdapterRef) -> None:
        self._fire(self.handle.options(multiplexed_model_id=adapter.id).pin.remote(adapter.id))

    def unpin(self, adapter_id: str) -> None:
        self._fire(self.handle.options(multiplexed_model_id=adapter_id).unpin.remote(adapter_id))

    def forget_adapter(self, adapter_id: str) -> None:
        # Best effort: requests resolve names through the store, so a deleted name is never routed
        # again; this only frees the memory of the replica Serve picks (the others' LRUs age it out).
        self._fire(self.handle.options(multiplexed_model_id=adapter_id).forget_adapter.remote(adapter_id))

    def _fire(self, response) -> None:
        async def wait():
            try:
                await response
            except Exception as exc:  # a lost replica loses its pins and caches with it
                log.warning("replica command failed: %s", exc)

        asyncio.ensure_future(wait())

    def stats(self) -> dict:
        """Sums of the replicas' last reported counters; adapters by their best tier anywhere."""
        merged: dict = {"waiting": 0, "running": 0, "slot_loads": 0, "slot_evictions": 0, "adapters": {},
                        "replicas": sorted(self._stats)}
        rank = {"device": 0, "loading": 1, "host": 2, "failed": 3}
        for stats in self._stats.values():
            for key in ("waiting", "running", "slot_loads", "slot_evictions"):
                merged[key] += int(stats.get(key, 0) or 0)
            for adapter_id, tier in (stats.get("adapters") or {}).items():
                best = merged["adapters"].get(adapter_id)
                if best is None or rank.get(tier, 9) < rank.get(best, 9):
                    merged["adapters"][adapter_id] = tier
        return merged

    def close(self) -> None:
        pass

"""`EngineReplica`: one Ray Serve replica running one `Engine`, adapters multiplexed by content id.

The ingress sends each request with `multiplexed_model_id` = the adapter's content id (never its
name: tenancy stays at the ingress, a new version is a new id, and identical bytes from two tenants
share one load). Serve routes it to a replica that reports that id when one can take it; the
replica fetches the blob from the store actor on first use and hands the engine an `AdapterRef`.
Many adapters still share each engine step: Ray only chooses the replica, the engine batches.
A forgotten content id (the ingress broadcasts `forget_adapter` once a deleted adapter's blob is
gone) is refused here unless the store has it again, even while Serve's LRU still lists it.

A per-request mix (server/mix.py) arrives as its mix id plus its parts' content ids and weights
(`mix=`): the replica fetches every part's blob and builds the `MixRef` itself, and forgetting a
part forgets the mixes built from it (server/cluster/mixes.py). A constrained request's grammar
arrives as its spec (`grammar=`) and is compiled here, cached per tenant as at the ingress.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
import tempfile
from pathlib import Path

from ray import serve

from server.cluster.mixes import ReplicaMixes, is_mix
from server.cluster.store import RemoteStore
from server.engine.grammar import CompiledGrammar, GrammarCache, GrammarSpec
from server.engine.mixes import make_mix_ref
from server.engine.types import AdapterRef, SamplingParams
from server.tenancy import TenantPins, submit

# Serve's replica-local LRU of model ids; the engine's own slots and host cache bound memory.
MODELS_PER_REPLICA = int(os.environ.get("LORASWAP_MODELS_PER_REPLICA", "8"))


def replica_name() -> str:
    context = serve.get_replica_context()
    replica_id = getattr(context, "replica_id", None)
    return str(getattr(replica_id, "unique_id", None) or getattr(context, "replica_tag", None) or "replica")


def compute_threads() -> int:
    """Intra-op threads for this replica's engine: its CPU share, rounded half up, at least 1.

    Ray sets OMP_NUM_THREADS to 1 for a fractional share, so 1.5 CPUs (one replica beside the
    ingress on a 2-core machine) would compute on one core while the other idles.
    """
    import ray

    share = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.floor(share + 0.5))


class EngineReplica:
    """Runs one engine; `generate` streams `(replica, TokenEvent)` pairs, the last with the engine's stats."""

    def __init__(self, config, base_dir: str, store_actor):
        import torch

        from server.cli import build_engine

        torch.set_num_threads(compute_threads())
        self.name = replica_name()
        self.engine = build_engine(config, Path(base_dir))
        self.store = RemoteStore(store_actor, Path(tempfile.mkdtemp(prefix="loraswap-replica-")))
        self.pins = TenantPins(self.engine)  # per (tenant, content id), whatever this engine supports
        self._started: asyncio.Task | None = None
        self.forgotten: set[str] = set()  # content ids forgotten since Serve's LRU last loaded them
        self.mixes = ReplicaMixes()  # the mixes asked of this replica and their parts
        self.grammars: GrammarCache | None = None  # made on the first constrained request

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self.engine.start())
        await asyncio.shield(self._started)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_adapter(self, content_id: str) -> AdapterRef:
        return await self._load(content_id)

    async def _load(self, content_id: str) -> AdapterRef:
        """Fetch the blob (a mix: every part's blob) from the store; AdapterNotFound once gone."""
        parts = self.mixes.parts(content_id) if is_mix(content_id) else None
        if parts is None:
            path = await asyncio.to_thread(self.store.materialize, content_id)
            return AdapterRef(id=content_id, path=path)
        refs = [await self._load(part) for part, _ in parts]
        return make_mix_ref([(ref, weight) for ref, (_, weight) in zip(refs, parts)])

    async def adapter(self, content_id: str, mix: tuple[tuple[str, float], ...] = ()) -> AdapterRef:
        """The adapter to run for `content_id` (with `mix`, the parts of a mix id); AdapterNotFound
        once forgotten and gone from the store."""
        if is_mix(content_id):
            for fallen in self.mixes.declare(content_id, mix):
                self._forget(fallen)
        if content_id in self.forgotten:
            # Serve's LRU may still hold the old ref: ask the store (identical bytes may be back).
            ref = await self._load(content_id)
            self.forgotten.discard(content_id)
            return ref
        return await self.get_adapter(content_id)

    async def serves(self, content_id: str, mix: tuple[tuple[str, float], ...] = ()) -> str:
        """This replica's name if it would serve `content_id` now (raises AdapterNotFound if not)."""
        await self.adapter(content_id, mix)
        return self.name

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        tenant: str = "default",
        avoid: tuple[str, ...] = (),  # read by the request router (replicas lost on earlier tries)
        mix: tuple[tuple[str, float], ...] = (),  # a mix id's parts: (content id, weight) pairs
        grammar: tuple[GrammarSpec, tuple[int, ...]] | None = None,  # (spec, end-of-turn ids) to compile
    ):
        yield self.name, None, None  # first word: the ingress knows who holds the request
        await self._ensure_started()
        content_id = serve.get_multiplexed_model_id()
        adapter = await self.adapter(content_id, mix) if content_id else None
        if grammar is not None:
            sampling = dataclasses.replace(sampling, grammar=await asyncio.to_thread(self._compile, tenant, *grammar))
        stream = submit(self.engine, request_id, prompt_ids, adapter, sampling, tenant)
        try:
            async for event in stream:
                final = event.finish_reason is not None
                yield self.name, event, (self.engine.stats() if final else None)
                if final:
                    break
        finally:
            await stream.aclose()

    def _compile(self, tenant: str, spec: GrammarSpec, end_ids: tuple[int, ...]) -> CompiledGrammar:
        """The grammar the ingress compiled and checked, compiled again for this engine (blocking)."""
        if self.grammars is None or tuple(self.grammars.end_ids) != end_ids:
            self.grammars = GrammarCache(self.engine.tokenizer, list(end_ids))
        return self.grammars.compile(tenant, spec)

    async def pin(self, adapter_id: str, tenant: str = "default") -> str:
        await self._ensure_started()
        adapter = await self.adapter(adapter_id)
        self.pins.pin(tenant, adapter)
        return self.name

    async def unpin(self, adapter_id: str, tenant: str = "default") -> None:
        self.pins.unpin(tenant, adapter_id)

    async def forget_adapter(self, adapter_id: str) -> str:
        """Drop the content and the mixes built from it from the engine, drop the local blob copy,
        and refuse them from now on (unless the store has the content again)."""
        for forgotten in (adapter_id, *self.mixes.built_from(adapter_id)):
            self._forget(forgotten)
        await asyncio.to_thread(shutil.rmtree, self.store.cache / adapter_id, True)
        return self.name

    def _forget(self, content_id: str) -> None:
        self.forgotten.add(content_id)
        self.engine.forget_adapter(content_id)

    async def ready(self) -> dict:
        """Started and answering: its name and stats (the ingress's `/ready` and metrics ask this)."""
        await self._ensure_started()
        return {"replica": self.name, "stats": self.engine.stats()}

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine loop makes Serve replace the replica."""
        thread = getattr(self.engine, "_thread", None)
        if self._started is not None and self._started.done() and (thread is None or not thread.is_alive()):
            raise RuntimeError("the engine loop is not running")

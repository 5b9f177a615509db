"""`ServerState`: everything one app instance serves with, built once by `create_app`.

It maps an OpenAI `model` string to what the engine runs (the base, or a tenant's adapter) and
turns messages into a checked prompt along the one path that chat completions and `/tokenize`
share: structural bounds -> (in the render pool) validate -> render -> length check. It owns the
consistency of deletes: a name is hidden at once, tombstoned durably in the store before DELETE
answers, and its blobs are collected only once no request or merge in flight still reads them.
No module-level state: each app owns one of these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from adapters.base import BaseInfo
from adapters.chat_template import ChatTemplate, RenderedPrompt
from server.admission import Admission, InFlight
from adapters.errors import AdapterNotFound, InvalidName
from adapters.store import AdapterRecord, Store
from server.bounds import check_messages
from server.engine.types import AdapterRef, AdapterResidency, EngineClient
from server.errors import PromptTooLong
from server.metrics import ServerMetrics
from server.pools import WorkerPools
from server.settings import ServerConfig
from server.tenancy import TenantPins

log = logging.getLogger("loraswap.server")


@dataclass(frozen=True)
class ResolvedModel:
    """The target of a request: `name` as the client said it, and the adapter (None = base)."""

    name: str
    adapter: AdapterRef | None
    record: AdapterRecord | None = None  # the store's record, for adapters
    components: tuple[AdapterRecord, ...] = ()  # a mix's adapters (server/mix.py); `adapter` is its MixRef

    def in_use(self) -> list[tuple[str, str | None]]:
        """(adapter id, blob sha256) of every stored adapter a request for this model reads."""
        if self.components:
            return [(record.id, record.sha256) for record in self.components]
        if self.adapter is None:
            return []
        return [(self.adapter.id, getattr(self.record, "sha256", None))]


@dataclass
class ServerState:
    """The per-app services, built once by `create_app`."""

    config: ServerConfig
    engine: EngineClient
    store: Store
    base_info: BaseInfo
    template: ChatTemplate
    base_id: str
    metrics: ServerMetrics
    admission: Admission
    pools: WorkerPools
    pins: TenantPins
    inflight: InFlight = field(default_factory=InFlight)
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    # (tenant, name) -> adapter id of names being deleted: hidden at once, until the store's
    # tombstone is durable.
    deleting: dict[tuple[str, str], str] = field(default_factory=dict)
    grammars: Any = None  # GrammarCache, made on the first structured-output request (api/decoding.py)
    mixes: Any = None  # MixChecks, made on the first request with an adapters mix (server/mix.py)
    # adapter id -> record of deleted content the engine may still cache, until its blob is gone.
    forget_pending: dict[str, AdapterRecord] = field(default_factory=dict)
    gc_wanted: bool = False  # a delete or publish may have left garbage that in-flight users hold
    _gc_task: Any = None
    _gc_again: bool = False

    def __post_init__(self):
        self.inflight.on_leave = self._after_leave

    @property
    def max_model_len(self) -> int:
        """The configured length, capped by what the engine's model supports."""
        return min(self.config.max_model_len, self.engine.max_model_len)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def resolve_model(self, tenant: str, model: str) -> ResolvedModel:
        """The base, or the adapter `model` in `tenant`'s namespace; anything else is 404.

        Another tenant's adapter, a deleted one and a malformed name all answer exactly like a
        name that never existed.
        """
        if model == self.base_id:
            return ResolvedModel(model, None)
        try:
            record = self.get_adapter(tenant, model)
        except (AdapterNotFound, InvalidName):
            raise AdapterNotFound(model, param="model") from None
        return ResolvedModel(model, AdapterRef(id=record.id, path=self.store.adapter_dir(record)), record)

    async def aresolve_model(self, tenant: str, model: str) -> ResolvedModel:
        """`resolve_model` for async routes: a store that lives elsewhere is awaited, never waited on.

        A store with an `aio` view (the cluster's `RemoteStore`, whose every call is a round trip to
        the store actor) is awaited so the event loop keeps serving other tenants meanwhile; the
        local store's lookups are small file reads and stay inline, as they always were.
        """
        aio = getattr(self.store, "aio", None)
        if aio is None or model == self.base_id:
            return self.resolve_model(tenant, model)
        try:
            record = await self.aget_adapter(tenant, model)
        except (AdapterNotFound, InvalidName):
            raise AdapterNotFound(model, param="model") from None
        path = await aio.adapter_dir(record)
        if self.is_deleting(tenant, model):  # a DELETE began while we awaited the store
            raise AdapterNotFound(model, param="model")
        return ResolvedModel(model, AdapterRef(id=record.id, path=path), record)

    async def aget_adapter(self, tenant: str, name: str) -> AdapterRecord:
        """`get_adapter` for async routes (see `aresolve_model`)."""
        aio = getattr(self.store, "aio", None)
        if aio is None or self.is_deleting(tenant, name):
            return self.get_adapter(tenant, name)
        return await aio.get(tenant, name)

    async def alist_adapters(self, tenant: str) -> list[AdapterRecord]:
        """`list_adapters` for async routes (see `aresolve_model`)."""
        aio = getattr(self.store, "aio", None)
        if aio is None:
            return self.list_adapters(tenant)
        return [record for record in await aio.list(tenant) if not self.is_deleting(tenant, record.name)]

    async def aadapter_dir(self, record: AdapterRecord):
        """`store.adapter_dir` for async routes (see `aresolve_model`)."""
        aio = getattr(self.store, "aio", None)
        return self.store.adapter_dir(record) if aio is None else await aio.adapter_dir(record)

    def is_deleting(self, tenant: str, name: str) -> bool:
        return (tenant, name) in self.deleting

    def get_adapter(self, tenant: str, name: str) -> AdapterRecord:
        """The store's record of `tenant`'s `name`; AdapterNotFound also while it is being deleted."""
        if self.is_deleting(tenant, name):
            raise AdapterNotFound(name, param="name")
        return self.store.get(tenant, name)

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        return [record for record in self.store.list(tenant) if not self.is_deleting(tenant, record.name)]

    async def delete_adapter(self, tenant: str, name: str) -> AdapterRecord:
        """Hide `name` now and delete it from the store; returns the deleted record.

        The store's tombstone is durable before this returns; blobs are collected later
        (`collect_garbage(in_use)`), skipping those a request or merge still reads on any version.
        """
        record = await self.aget_adapter(tenant, name)
        self.deleting[(tenant, name)] = record.id
        try:
            versions = await self.pools.run(self.pools.store, self.store.versions, tenant, name)
            await self.pools.run(self.pools.store, partial(self.store.delete, tenant, name, collect=False))
        finally:
            self.deleting.pop((tenant, name), None)
        self._deleted(tenant, versions)
        return record

    def _deleted(self, tenant: str, versions: list[AdapterRecord]) -> None:
        self.pins.forget(tenant, {version.id for version in versions})
        self.forget_pending.update({version.id: version for version in versions})
        self.gc_wanted = True
        self.collect_garbage_soon()

    async def publish(
        self, tenant: str, name: str, adapter: Any, pool: ThreadPoolExecutor
    ) -> tuple[AdapterRecord, bool]:
        """`store.publish` in `pool`; versions it pruned then leave like deleted ones.

        Publishing keeps `max_versions_kept` versions of a name: the pruned contents lose the
        tenant's pins, and the engine forgets them once their blobs are collected (unless the
        same bytes are still referenced elsewhere, which keeps the blob and so the engine's copy).
        """

        def run() -> tuple[AdapterRecord, bool, list[AdapterRecord]]:
            try:
                before = self.store.versions(tenant, name)
            except AdapterNotFound:
                before = []
            record, created = self.store.publish(tenant, name, adapter)
            if not created or not before:
                return record, created, []
            kept = {version.id for version in self.store.versions(tenant, name)}
            return record, created, [version for version in before if version.id not in kept]

        record, created, pruned = await self.pools.run(pool, run)
        if pruned:
            self._deleted(tenant, pruned)
        elif created:
            self.published()
        return record, created

    def published(self) -> None:
        """A new version was published: the store may have pruned old ones; collect their blobs."""
        self.gc_wanted = True
        self.collect_garbage_soon()

    def _after_leave(self) -> None:
        if self.gc_wanted:
            self.collect_garbage_soon()

    def collect_garbage_soon(self) -> None:
        """Collect unreferenced blobs in the store's thread (one run at a time, re-run if asked)."""
        if self._gc_task is not None and not self._gc_task.done():
            self._gc_again = True
            return
        self._gc_task = asyncio.ensure_future(self._collect_garbage())

    async def _collect_garbage(self) -> None:
        while True:
            self._gc_again = False
            in_use = self.inflight.in_use()
            try:
                await self.pools.run(self.pools.store, self.store.collect_garbage, in_use)
            except Exception:
                log.exception("garbage collection of the adapter store failed")
            # What was in use may hold garbage back: collect again when its users leave.
            self.gc_wanted = bool(in_use)
            await self._forget_collected()
            if not self._gc_again:
                return

    async def _forget_collected(self) -> None:
        """The engine drops deleted content once no blob of it is left (no tenant holds it)."""
        for adapter_id, record in list(self.forget_pending.items()):
            if not (await self.aadapter_dir(record)).is_dir():
                del self.forget_pending[adapter_id]
                self.engine.forget_adapter(adapter_id)
                for mix_id in self.mixes.forget_adapter(adapter_id) if self.mixes is not None else ():
                    self.engine.forget_adapter(mix_id)  # the mixes composed from it (server/mix.py)

    def residency(self, tenant: str) -> dict[str, AdapterResidency]:
        """adapter id -> where it lives now as `tenant` may see it; absent means on disk only."""
        return self.pins.residency(tenant)

    async def render_prompt(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> tuple[RenderedPrompt, int]:
        """`prepare_prompt` in the render pool, after the cheap structural bounds (400 `messages`).

        Rendering and tokenizing cost time linear in the prompt; run on the event loop they
        would stall every other tenant's requests and `/health`.
        """
        check_messages(messages, self.config.limits)
        return await self.pools.run(
            self.pools.render,
            self.prepare_prompt,
            messages,
            max_tokens=max_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
        )

    def prepare_prompt(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> tuple[RenderedPrompt, int]:
        """Validate and render `messages`, then check the length; returns (prompt, max_tokens).

        Without `max_tokens` the completion may use the rest of the model length (at least 1).

        Raises:
            TemplateError: the messages break the template's contract (-> 400).
            PromptTooLong: prompt tokens + max_tokens exceed max_model_len (-> 400, both counts).
        """
        rendered = self.template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,  # checked by `api.tools.plan_tools`; rendered only by templates with tool support
        )
        limit = self.max_model_len
        count = len(rendered.ids)
        wanted = max_tokens if max_tokens is not None else max(limit - count, 1)
        if count + wanted > limit:
            raise PromptTooLong(
                f"This model's maximum context length is {limit} tokens; the messages take {count} tokens "
                f"and {wanted} more were requested for the completion ({count + wanted} in total)",
                param="messages",
            )
        return rendered, wanted

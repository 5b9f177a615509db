"""`ServerState`: everything one app instance serves with, built once by `create_app`.

It maps an OpenAI `model` string to what the engine runs (the base, or a tenant's adapter) and
turns messages into a checked prompt along the one path that chat completions and `/tokenize`
share: validate -> render -> length check. No module-level state: each app owns one of these.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from adapters.base import BaseInfo
from adapters.chat_template import ChatTemplate, RenderedPrompt
from server.admission import Admission, InFlight
from adapters.errors import AdapterNotFound, InvalidName
from server.errors import PromptTooLong
from adapters.store import AdapterRecord, AdapterStore
from server.engine.types import AdapterRef, AdapterResidency, EngineClient
from server.metrics import ServerMetrics
from server.settings import ServerConfig


@dataclass(frozen=True)
class ResolvedModel:
    """The target of a request: `name` as the client said it, and the adapter (None = base)."""

    name: str
    adapter: AdapterRef | None
    record: AdapterRecord | None = None  # the store's record, for adapters


@dataclass
class ServerState:
    """The per-app services, built once by `create_app`."""

    config: ServerConfig
    engine: EngineClient
    store: AdapterStore
    base_info: BaseInfo
    template: ChatTemplate
    base_id: str
    metrics: ServerMetrics
    admission: Admission
    inflight: InFlight = field(default_factory=InFlight)
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    # (tenant, name) -> adapter id of names deleted while requests still use them: hidden at
    # once, removed from the store when the last of those requests finishes.
    deleting: dict[tuple[str, str], str] = field(default_factory=dict)

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
        """Hide `name` now; delete it from the store (and the engine) once its requests finish.

        The store removes the files of content no other name uses, so it must wait for requests
        that may still load them. Returns the deleted record.
        """
        record = self.get_adapter(tenant, name)
        self.deleting[(tenant, name)] = record.id
        if self.inflight.counts.get(record.id, 0) == 0:
            await self._finish_delete(tenant, name, record)
        else:
            self.inflight.when_idle(record.id, lambda: asyncio.ensure_future(self._finish_delete(tenant, name, record)))
        return record

    async def _finish_delete(self, tenant: str, name: str, record: AdapterRecord) -> None:
        try:
            await asyncio.to_thread(self.store.delete, tenant, name)
        finally:
            self.deleting.pop((tenant, name), None)
        if not self.store.adapter_dir(record).is_dir():  # no other name holds the same content
            self.engine.forget_adapter(record.id)

    def residency(self) -> dict[str, AdapterResidency]:
        """adapter id -> where it lives now (tier, folded, pinned); absent means on disk only."""
        return self.engine.stats().residency()

    def prepare_prompt(
        self,
        messages: list[dict],
        *,
        max_tokens: int | None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> tuple[RenderedPrompt, int]:
        """Validate and render `messages`, then check the length; returns (prompt, max_tokens).

        Without `max_tokens` the completion may use the rest of the model length (at least 1).

        Raises:
            TemplateError: the messages break the template's contract (-> 400).
            PromptTooLong: prompt tokens + max_tokens exceed max_model_len (-> 400, both counts).
        """
        rendered = self.template.render(
            messages, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message
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

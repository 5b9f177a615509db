"""A small `EngineClient` (the real engine's interface), for HTTP tests that do not check model output.

It really runs: a background loop emits one token per step for every running request (the next
token of a fixed reply, decoded incrementally with the real tokenizer), honours max_tokens,
min_tokens, ignore_eos and stop token ids, and `abort` ends a request at the next step. It keeps
the bookkeeping the tests inspect: running requests, aborted ids, pins, forgotten adapters, the
adapter each request used, and a `gate` that holds every step while cleared.

It follows the issue-9 engine contract: `add_request(..., tenant=)`, pins keyed by (tenant,
content id) (`pin(adapter, tenant)`, `unpin(adapter_id, tenant)`), `tenant_residency(tenant)`
showing only what that tenant used or pinned, and aborts that carry `error_code` / `error_status`
(`fail_next[tenant]` ends that tenant's next stepped request that way).
`tests/server/test_engine_contract.py` keeps its signatures equal to the protocol's.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import AdapterRef, AdapterResidency, EngineStats, FoldView, SamplingParams, TokenEvent

REPLY = "Hello! How can I help you today?"


@dataclass
class _Running:
    request_id: str
    prompt_ids: list[int]
    adapter: AdapterRef | None
    sampling: SamplingParams
    queue: asyncio.Queue
    tenant: str = "default"
    emitted: list[int] = field(default_factory=list)
    text: str = ""


class FakeEngine:
    tokenizer: Any
    max_model_len: int

    def __init__(self, tokenizer: Any, step_s: float = 0.002, reply: str = REPLY, max_model_len: int = 1 << 20):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len  # no positional limit of its own: the server's config decides
        self.step_s = step_s
        self.reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        self.eos_id = tokenizer.eos_token_id
        self.running: dict[str, _Running] = {}
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.pins: dict[str, set[str]] = defaultdict(set)  # adapter id -> tenants pinning it
        self.used: dict[str, set[str]] = defaultdict(set)  # tenant -> adapter ids it ran or pinned
        self.tenants: dict[str, str] = {}  # request id -> tenant
        self.fail_next: dict[str, tuple[str, str, int]] = {}  # tenant -> (error, code, status), once
        self.forgotten: list[str] = []
        self.adapters_seen: dict[str, str | None] = {}
        self.prompts: dict[str, list[int]] = {}
        self.gate = threading.Event()  # cleared by a test thread: every step waits
        self.gate.set()
        self._task: asyncio.Task | None = None
        self.started = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())
        self.started = True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.started = False

    @property
    def pinned(self) -> set[str]:
        """Content ids some tenant pins (the operator-wide view)."""
        return {adapter_id for adapter_id, tenants in self.pins.items() if tenants}

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: AdapterRef | None,
        sampling: SamplingParams,
        tenant: str = "default",
    ) -> AsyncIterator[TokenEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        self.running[request_id] = _Running(request_id, list(prompt_ids), adapter, sampling, queue, tenant)
        self.adapters_seen[request_id] = adapter.id if adapter else None
        self.tenants[request_id] = tenant
        if adapter is not None:
            self.used[tenant].add(adapter.id)
        self.prompts[request_id] = list(prompt_ids)
        return self._stream(queue)

    async def _stream(self, queue):
        while True:
            event = await queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def abort(self, request_id: str) -> None:
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self.aborted.append(request_id)
            seq.queue.put_nowait(TokenEvent(request_id, None, "", finish_reason="abort"))

    def pin(self, adapter: AdapterRef, tenant: str = "default") -> None:
        self.pins[adapter.id].add(tenant)
        self.used[tenant].add(adapter.id)

    def unpin(self, adapter_id: str, tenant: str = "default") -> None:
        self.pins[adapter_id].discard(tenant)

    def tenant_residency(self, tenant: str) -> dict[str, AdapterResidency]:
        """Only ids this tenant used or pinned; `pinned` is its own pin."""
        stats = self.stats()
        return {
            aid: AdapterResidency(
                stats.adapters.get(aid, "disk"), aid == stats.fold.folded, tenant in self.pins.get(aid, ())
            )
            for aid in self.used.get(tenant, ())
            if aid in stats.adapters
        }

    def forget_adapter(self, adapter_id: str, tenant: str | None = None) -> None:
        self.forgotten.append(adapter_id)

    def stats(self) -> EngineStats:
        """Running adapters and pins are "device"; the first pinned adapter counts as folded."""
        adapters = {seq.adapter.id: "device" for seq in self.running.values() if seq.adapter is not None}
        adapters.update({adapter_id: "device" for adapter_id in self.pinned})
        pinned = tuple(sorted(self.pinned))
        return EngineStats(
            running=len(self.running),
            waiting=0,
            adapters=adapters,
            fold=FoldView(folded=next(iter(pinned), None), pinned=pinned),
        )

    async def _loop(self):
        while True:
            await asyncio.sleep(self.step_s)
            if not self.gate.is_set():
                continue
            for seq in list(self.running.values()):
                self._step(seq)

    def _step(self, seq: _Running):
        if seq.tenant in self.fail_next:  # this sequence's own fault ends it, and only it
            error, code, status = self.fail_next.pop(seq.tenant)
            del self.running[seq.request_id]
            event = TokenEvent(seq.request_id, None, "", finish_reason="abort", error=error)
            event.error_code, event.error_status = code, status  # the contract's fields (iso-engine)
            seq.queue.put_nowait(event)
            return
        n = len(seq.emitted)
        params = seq.sampling
        token = self.reply_ids[n] if n < len(self.reply_ids) else self.eos_id
        if token == self.eos_id and (params.ignore_eos or n < params.min_tokens):
            token = self.reply_ids[n % len(self.reply_ids)]
        seq.emitted.append(token)
        is_stop = token in params.stop_token_ids or token == self.eos_id and not params.ignore_eos
        full = self.tokenizer.decode(seq.emitted, skip_special_tokens=True)
        text, seq.text = full[len(seq.text) :], full
        finish = "stop" if is_stop else "length" if len(seq.emitted) >= params.max_tokens else None
        if finish is not None:
            del self.running[seq.request_id]
            self.finished.append(seq.request_id)
        seq.queue.put_nowait(
            TokenEvent(
                seq.request_id,
                token,
                "" if is_stop else text,
                finish_reason=finish,
                logprob=-0.5,
                top_logprobs=[(token, -0.5)] * (params.logprobs or 0),
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.emitted),
            )
        )

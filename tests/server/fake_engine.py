"""A small `EngineClient` (the real engine's interface), for HTTP tests that do not check model output.

It really runs: a background loop emits one token per step for every running request (the next
token of a fixed reply, decoded incrementally with the real tokenizer), honours max_tokens,
min_tokens, ignore_eos and stop token ids, and `abort` ends a request at the next step. It keeps
the bookkeeping the tests inspect: running requests, aborted ids, pins, forgotten adapters, the
adapter each request used, and a `gate` that holds every step while cleared.
`tests/server/test_engine_contract.py` keeps its signatures equal to the protocol's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import AdapterRef, EngineStats, FoldView, SamplingParams, TokenEvent

REPLY = "Hello! How can I help you today?"


@dataclass
class _Running:
    request_id: str
    prompt_ids: list[int]
    adapter: AdapterRef | None
    sampling: SamplingParams
    queue: asyncio.Queue
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
        self.pinned: set[str] = set()
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

    def add_request(
        self, request_id: str, prompt_ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        self.running[request_id] = _Running(request_id, list(prompt_ids), adapter, sampling, queue)
        self.adapters_seen[request_id] = adapter.id if adapter else None
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

    def pin(self, adapter: AdapterRef) -> None:
        self.pinned.add(adapter.id)

    def unpin(self, adapter_id: str) -> None:
        self.pinned.discard(adapter_id)

    def forget_adapter(self, adapter_id: str) -> None:
        self.forgotten.append(adapter_id)

    def stats(self) -> EngineStats:
        """Running adapters and pins are "device"; the first pinned adapter counts as folded."""
        adapters = {seq.adapter.id: "device" for seq in self.running.values() if seq.adapter is not None}
        adapters.update({adapter_id: "device" for adapter_id in self.pinned})
        pinned = tuple(sorted(self.pinned))
        return EngineStats(running=len(self.running), waiting=0, adapters=adapters,
                           fold=FoldView(folded=next(iter(pinned), None), pinned=pinned))

    async def _loop(self):
        while True:
            await asyncio.sleep(self.step_s)
            if not self.gate.is_set():
                continue
            for seq in list(self.running.values()):
                self._step(seq)

    def _step(self, seq: _Running):
        n = len(seq.emitted)
        params = seq.sampling
        token = self.reply_ids[n] if n < len(self.reply_ids) else self.eos_id
        if token == self.eos_id and (params.ignore_eos or n < params.min_tokens):
            token = self.reply_ids[n % len(self.reply_ids)]
        seq.emitted.append(token)
        is_stop = token in params.stop_token_ids or token == self.eos_id and not params.ignore_eos
        full = self.tokenizer.decode(seq.emitted, skip_special_tokens=True)
        text, seq.text = full[len(seq.text):], full
        finish = "stop" if is_stop else "length" if len(seq.emitted) >= params.max_tokens else None
        if finish is not None:
            del self.running[seq.request_id]
            self.finished.append(seq.request_id)
        seq.queue.put_nowait(TokenEvent(seq.request_id, token, "" if is_stop else text, finish_reason=finish,
                                        logprob=-0.5, top_logprobs=[(token, -0.5)] * (params.logprobs or 0),
                                        prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.emitted)))

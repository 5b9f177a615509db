"""`Engine`: the threaded, asyncio-facing front of `EngineCore`; the server's `EngineClient`.

`await start()` runs the core's loop (`run_until`) in a dedicated thread, so model steps never
block the asyncio event loop; `add_request` returns an async iterator of `TokenEvent`s fed from
that thread, all of a step's events in one hop (`server.engine.delivery`); `await stop()` ends the
loop, aborting what is still in flight. Everything about
models, steps and commands is in `server.engine.core`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.delivery import EventStream, Outbox
from server.engine.errors import EngineStopped
from server.engine.types import AdapterRef, SamplingParams, TokenEvent


class Engine(EngineCore):
    """The serving engine; satisfies `EngineClient` (see server/engine/types.py)."""

    tokenizer: Any
    max_model_len: int

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._outbox = Outbox()

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: AdapterRef | None,
        sampling: SamplingParams,
        tenant: str = "default",
    ) -> AsyncIterator[TokenEvent]:
        """Queue a request; returns its stream of events (call from inside the event loop).

        Raises PromptTooLong / DuplicateRequest / EngineStopped at once. Closing the iterator
        early (a client disconnect) aborts the request. `tenant` decides the fair share of slots
        and admission, and which adapters `tenant_residency(tenant)` shows.
        """
        if not self.running:
            raise EngineStopped("the engine loop is not running; await engine.start() first")
        stream = EventStream(asyncio.get_running_loop())
        self._submit(request_id, prompt_ids, adapter, sampling, self._outbox.sink(stream), tenant)
        return self._stream(request_id, stream)

    async def _stream(self, request_id: str, stream: EventStream) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            async for event in stream:
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.abort(request_id)

    def _delivered(self) -> None:
        """After each loop iteration: this iteration's events go out, one hop per event loop."""
        self._outbox.flush()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish the loop; requests still in flight end with finish_reason "abort"."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join)
        self._thread = None

    def _loop(self) -> None:
        try:
            self.run_until(lambda: self._stopping)
            self.abort_all()
        finally:
            self._outbox.flush()

    def _wait(self, done: threading.Event) -> None:
        """`generate` while the loop thread runs: that thread serves it; wait."""
        if self.running:
            done.wait()
        else:
            super()._wait(done)

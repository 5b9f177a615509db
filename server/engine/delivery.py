"""Token events from the engine thread to asyncio, in one hop per step for every request.

The engine thread appends each event to an `Outbox`; after a loop iteration (a step, or the
commands applied between steps) `flush` hands everything collected to each event loop with ONE
`call_soon_threadsafe`, instead of one per token per request: with 16 streams that is one wake-up
of the event loop per step, not 16, and the events reach each `EventStream`'s buffer in one pass.
An `EventStream` is a request's buffer on the event-loop side: a deque plus the one future its
reader waits on when the buffer is empty. Nothing here knows about models or steps.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

from server.engine.types import TokenEvent


class EventStream:
    """One request's events on its event loop; fed by `Outbox.flush`, read by `__aiter__`."""

    __slots__ = ("loop", "events", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: deque[TokenEvent] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def push(self, event: TokenEvent) -> None:
        """Event-loop thread only."""
        self.events.append(event)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        """Every event up to and including the first with a finish_reason."""
        while True:
            if not self.events:
                self.waiter = self.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            event = self.events.popleft()
            yield event
            if event.finish_reason is not None:
                return


def _deliver(batch: list[tuple[EventStream, TokenEvent]]) -> None:
    for stream, event in batch:
        stream.push(event)


class Outbox:
    """Events the engine thread produced since the last `flush`, grouped by event loop."""

    def __init__(self) -> None:
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[EventStream, TokenEvent]]] = {}
        self._lock = threading.Lock()  # `sink` and `flush` both run on the engine thread; cheap insurance

    def sink(self, stream: EventStream) -> Callable[[TokenEvent], None]:
        """The engine's sink for one request: collect its events for the next flush."""

        def put(event: TokenEvent) -> None:
            with self._lock:
                self._pending.setdefault(stream.loop, []).append((stream, event))

        return put

    def flush(self) -> None:
        """Hand everything collected to its event loop, one call per loop (engine thread)."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, {}
        for loop, batch in pending.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:
                pass  # that loop is closed: nobody is left to read these events

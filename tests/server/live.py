"""Run an app under a real uvicorn on 127.0.0.1 (a free port) in a background thread.

Real sockets matter here: streaming, client disconnects and graceful shutdown behave as in
production, which an in-memory ASGI transport cannot show.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn


class LiveServer:
    """`with LiveServer(app) as server: server.url ...`; the lifespan runs on enter and exit."""

    def __init__(self, app, timeout_graceful_shutdown: int | None = None):
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", timeout_graceful_shutdown=timeout_graceful_shutdown
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self):
        async def serve():
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self._sock])

        asyncio.run(serve())

    def __enter__(self) -> "LiveServer":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())

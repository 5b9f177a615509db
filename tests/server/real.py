"""The real engine on the tiny base behind a live server: one recipe for every API test that needs
what a real model says (tests/server's shared `real_server`, the sidecar's own app with jobs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.settings import ServerConfig
from tests.server.live import LiveServer


def tiny_engine(base_dir: Path, **overrides):
    """An eager float32 CPU engine over `base_dir` with room for a few adapters and long outputs."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    settings = dict(
        base=base_dir,
        quant="none",
        dtype="float32",
        device="cpu",
        max_loras=2,
        max_cpu_loras=4,
        max_model_len=512,
        block_size=8,
        num_kv_blocks=512,
        fold="off",
    )
    settings.update(overrides)
    return Engine(EngineConfig(**settings))


@contextmanager
def real_live_server(
    base_dir: Path, store_dir: Path, config: ServerConfig | None = None, **engine_overrides
) -> Iterator[LiveServer]:
    """A live app over `tiny_engine(base_dir, **engine_overrides)` and a fresh store; the engine is
    closed on exit.

    The yielded server also carries `engine`, `state` (the app's `ServerState`) and `base` (its id).
    """
    from adapters.base import BaseInfo
    from adapters.store import AdapterStore
    from server.app import create_app

    engine = tiny_engine(base_dir, **engine_overrides)
    try:
        app = create_app(
            config or ServerConfig(max_model_len=512),
            engine,
            AdapterStore(store_dir),
            base_info=BaseInfo.from_dir(base_dir),
        )
        with LiveServer(app) as live:
            live.engine, live.state = engine, app.state.loraswap
            live.base = live.state.base_id
            yield live
    finally:
        engine.close()


def openai_client(server, timeout: float = 120):
    """The official client against `server` (no API keys configured: any key is accepted)."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=timeout)

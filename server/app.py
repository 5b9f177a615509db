"""`create_app(config, engine, store)`: the FastAPI application over one engine and one store.

The lifespan starts the engine loop and marks the app ready; on shutdown (after uvicorn's
graceful drain of open connections) it refuses new work, waits up to `drain_timeout_s` for
requests still in flight, then stops the engine. Every request first passes `server.edge.Edge`
(auth, size cap and read deadline before the body). Nothing is global: a test builds as many apps
as it likes, each with its own metrics registry.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI

from adapters.base import BaseInfo, resolve_base
from adapters.chat_template import ChatTemplate
from adapters.store import Store
from server.admission import Admission
from server.api import (
    adapters,
    chat,
    completions,
    files,
    fine_tuning,
    health,
    merge,
    models,
    tokenize,
    trainer_service,
)
from server.api.errors import install_error_handlers
from server.edge import Edge
from server.engine.types import EngineClient
from server.metrics import ServerMetrics
from server.pools import WorkerPools
from server.settings import ServerConfig
from server.state import ServerState
from server.tenancy import TenantPins

log = logging.getLogger("loraswap.server")


def create_app(config: ServerConfig, engine: EngineClient, store: Store, base_info: BaseInfo | None = None) -> FastAPI:
    """Build the app.

    Args:
        config: server settings (limits, keys, max_model_len, base id).
        engine: any `EngineClient` (the real `Engine`, a test fake); started and stopped by the
            app's lifespan.
        store: the adapter store uploads are published to.
        base_info: the served base's `BaseInfo` (uploads are validated against it); read from
            `config.base` when omitted.
    """
    if base_info is None:
        base_info = BaseInfo.from_dir(resolve_base(config.base))
    base_id = config.served_model_name or Path(base_info.path).name
    state = ServerState(
        config=config,
        engine=engine,
        store=store,
        base_info=base_info,
        template=ChatTemplate(engine.tokenizer, base_info.chat_template),
        base_id=base_id,
        metrics=ServerMetrics(engine.stats),
        # A tenant's limit is also its share of the queue: one tenant never fills it for all.
        admission=Admission(
            min(config.max_concurrent_per_tenant, config.limits.tenant_capacity(config.capacity)),
            config.capacity,
            config.retry_after_s,
        ),
        pools=WorkerPools(config.limits, config.retry_after_s),
        pins=TenantPins(engine),
    )

    async def collect_periodically():
        while True:
            await asyncio.sleep(config.limits.gc_interval_s)
            state.collect_garbage_soon()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        state.ready = True
        collector = asyncio.ensure_future(collect_periodically())
        log.info("serving %s (max_model_len %d)", base_id, state.max_model_len)
        try:
            yield
        finally:
            collector.cancel()
            with suppress(asyncio.CancelledError):
                await collector
            state.admission.draining = True
            if not await state.admission.drained(config.drain_timeout_s):
                log.warning(
                    "%d requests still in flight after %.0fs; stopping anyway",
                    state.admission.total,
                    config.drain_timeout_s,
                )
            state.ready = False
            await engine.stop()
            state.pools.shutdown()

    app = FastAPI(title="loraswap", version="0.1.0", lifespan=lifespan)
    app.state.loraswap = state
    install_error_handlers(app)
    app.add_middleware(Edge, config=config)
    for module in (chat, completions, models, merge, adapters, tokenize, health, files, fine_tuning, trainer_service):
        app.include_router(module.router)
    return app

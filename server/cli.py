"""`loraswap serve`: flags and `LORASWAP_*` environment -> engine + store + app -> uvicorn.

Flags win over the environment, which wins over defaults: pydantic-settings generates the flags from
`ServerConfig`'s fields and does the merge.
SIGTERM / Ctrl-C: uvicorn stops accepting connections and waits up to `--drain-timeout` for the
open ones (streams included) to finish; our handler also makes the app refuse new requests on
kept-alive connections (503) and drop out of `/ready` at once; the lifespan then stops the engine.
"""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic_settings import CliApp, CliSettingsSource

from adapters.store import AdapterStore, default_store_root
from adapters.store_limits import StoreLimits
from server.settings import ServerConfig, ServerSettings


def parse_args(argv: list[str]) -> ServerConfig:
    """Flags (generated from `ServerConfig`'s fields, kebab-case) over `LORASWAP_*` over defaults.

    Raises ValueError (a pydantic ValidationError) naming the setting on a bad value; argparse
    exits on an unknown flag or `--help`.
    """
    cli: CliSettingsSource[ServerSettings] = CliSettingsSource(
        ServerSettings, cli_prog_name="loraswap serve", cli_kebab_case=True, cli_implicit_flags=False
    )
    return CliApp.run(ServerSettings, cli_args=argv, cli_settings_source=cli)


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new requests as soon as a signal arrives."""

    admission = None

    def handle_exit(self, sig, frame) -> None:
        if self.admission is not None:
            self.admission.draining = True
        super().handle_exit(sig, frame)


def build_engine(config: ServerConfig, base_dir):
    """The engine for `config`, on the resolved base directory."""
    from server.engine.engine import Engine

    return Engine(config.to_engine_config(base_dir))


def build_store(config: ServerConfig) -> AdapterStore:
    root = config.store if config.store is not None else default_store_root()
    return AdapterStore(root, limits=StoreLimits(**config.limits.store_quotas()))


def main(argv: list[str]) -> int:
    from adapters.base import BaseInfo, resolve_base
    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.cluster.flags import split_cluster_flags

    try:
        argv, cluster = split_cluster_flags(argv)  # --replicas N, --ray-address ADDR, --router (Ray Serve)
        config = parse_args(argv)
    except ValueError as exc:
        print(f"loraswap serve: {exc}", file=sys.stderr)
        return 2
    if cluster.replicas is not None:
        from server.cluster.launch import main as serve_on_ray

        return serve_on_ray(config, cluster.replicas, cluster.ray_address, cluster.router or "bounded")
    base_dir = resolve_base(config.base)
    base_info = BaseInfo.from_dir(base_dir)
    engine = build_engine(config, base_dir)
    store = build_store(config)
    child = None
    if config.train_in_process:
        from server import trainer_child

        config = trainer_child.prepare(config, store.root)
        child = trainer_child.start(config)
    app = create_app(config, engine, store, base_info=base_info)
    server = _DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level="info",
            timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)),
        )
    )
    server.admission = app.state.loraswap.admission
    try:
        server.run()
    finally:
        engine.close()  # the app's lifespan stopped the loop; release the loader threads
        if child is not None:
            trainer_child.stop(child)
    return 0

"""`loraswap serve`: flags and `LORASWAP_*` environment -> engine + store + app -> uvicorn.

Flags win over the environment, which wins over defaults (pydantic-settings does the merge).
SIGTERM / Ctrl-C: uvicorn stops accepting connections and waits up to `--drain-timeout` for the
open ones (streams included) to finish; our handler also makes the app refuse new requests on
kept-alive connections (503) and drop out of `/ready` at once; the lifespan then stops the engine.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from server.settings import ServerConfig, ServerSettings

_FLAGS = {
    # flag: (type, help)
    "host": (str, "bind address (default 127.0.0.1)"),
    "port": (int, "port (default 8000)"),
    "base": (str, "'default' (embedded SmolLM2-135M-Instruct) or a local HF model directory"),
    "served-model-name": (str, "the base's id in /v1/models (default: its directory name)"),
    "quant": (str, "nf4 (bitsandbytes, default) or none"),
    "dtype": (str, "auto, float32, bfloat16 or float16"),
    "device": (str, "auto, cpu or cuda"),
    "store": (str, "adapter store directory (default: under the user's data directory)"),
    "max-loras": (int, "adapter slots on the device (default 8)"),
    "max-cpu-loras": (int, "adapters cached in host memory (default 64)"),
    "max-rank": (int, "largest adapter rank accepted and served (default 64)"),
    "max-model-len": (int, "prompt + completion tokens per request (default 2048)"),
    "max-num-seqs": (int, "requests in the running batch (default 32)"),
    "fold": (str, "off, pinned or auto: when to fold an adapter into dense weights (default auto)"),
    "kv-cache-mb": (int, "memory for the paged KV cache in MiB (default 512)"),
    "api-keys-file": (str, "file of tenant:key lines (LORASWAP_API_KEYS='tenant:key,...' also works)"),
    "max-concurrent-per-tenant": (int, "requests in flight per tenant before 429 (default 16)"),
    "max-queue": (int, "requests queued beyond max-num-seqs before 503 (default 64)"),
    "max-upload-mb": (int, "largest adapter upload in MiB (default 512)"),
    "drain-timeout-s": (float, "seconds to let requests in flight finish on SIGTERM (default 30)"),
    "jobs-dir": (str, "fine-tuning jobs: database, files and work folders (default: beside the store)"),
    "jobs-db": (str, "the jobs SQLite database (default: JOBS_DIR/jobs.db)"),
    "files-dir": (str, "uploaded training files (default: JOBS_DIR/files)"),
    "max-file-mb": (int, "largest training file upload in MiB (default 64)"),
    "max-files-per-tenant": (int, "training files one tenant may keep (default 100)"),
    "max-active-jobs-per-tenant": (int, "queued + running fine-tuning jobs per tenant (default 4)"),
    "service-key": (str, "the trainer sidecar's publishing credential (LORASWAP_SERVICE_KEY)"),
}


def parse_args(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="loraswap serve", description="Run the OpenAI-compatible server.")
    for flag, (type_, help_) in _FLAGS.items():
        parser.add_argument(f"--{flag}", type=type_, default=None, help=help_)
    parser.add_argument("--train-in-process", action="store_true", default=None,
                        help="also run the trainer sidecar as a child process (same database)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    return ServerSettings(**overrides).to_config()


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the app to refuse new requests as soon as a signal arrives."""

    admission = None

    def handle_exit(self, sig, frame) -> None:
        if self.admission is not None:
            self.admission.draining = True
        super().handle_exit(sig, frame)


def build_engine(config: ServerConfig, base_dir):
    """The engine for `config`, on the resolved base directory (loads the model in `start()`)."""
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine

    return Engine(EngineConfig(
        base=base_dir, quant=config.quant, dtype=config.dtype, device=config.device,
        max_loras=config.max_loras, max_cpu_loras=config.max_cpu_loras, max_lora_rank=config.max_rank,
        max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs, fold=config.fold,
        kv_cache_bytes=config.kv_cache_bytes,
    ))


def build_store(config: ServerConfig):
    from adapters.store import AdapterStore, default_store_root

    return AdapterStore(config.store if config.store is not None else default_store_root())


def main(argv: list[str]) -> int:
    from adapters.base import BaseInfo, resolve_base
    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv)
    except ValueError as exc:
        print(f"loraswap serve: {exc}", file=sys.stderr)
        return 2
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
    server = _DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="info",
        timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)),
    ))
    server.admission = app.state.loraswap.admission
    try:
        server.run()
    finally:
        engine.close()  # the app's lifespan stopped the loop; release the loader threads
        if child is not None:
            trainer_child.stop(child)
    return 0

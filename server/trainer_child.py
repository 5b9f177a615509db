"""`loraswap serve --train-in-process`: the trainer sidecar as a child process of the server.

The child is the ordinary `loraswap trainer-service` (started by module name, so the server never
imports trainer code) on the same jobs database and files, publishing through the same service
route as a separate sidecar would. Without a configured service key, a random one is made for
this run and handed to the child in its environment (never on its command line).
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from jobs.config import jobs_config_for
from server.settings import ServerConfig, jobs_fields

log = logging.getLogger("loraswap.server")


def prepare(config: ServerConfig, store_root: Path) -> ServerConfig:
    """`config` with the jobs location fixed and a service key, as both processes must share them."""
    jobs = jobs_config_for(config.jobs, store_root)
    jobs = replace(jobs, root=jobs.resolved_root, service_key=jobs.service_key or secrets.token_urlsafe(32))
    return config.model_copy(update=jobs_fields(jobs))


def start(config: ServerConfig, device: str | None = None) -> subprocess.Popen:
    """Start the sidecar for `config` (from `prepare`); it trains on the base the server serves."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    jobs = config.jobs
    argv = [
        sys.executable,
        "-m",
        "loraswap.cli",
        "trainer-service",
        "--jobs-dir",
        str(jobs.resolved_root),
        "--jobs-db",
        str(jobs.database),
        "--files-dir",
        str(jobs.files),
        "--server-url",
        f"http://{host}:{config.port}",
        "--base",
        config.base,
        "--device",
        device or config.device,
    ]
    env = dict(os.environ, LORASWAP_SERVICE_KEY=str(jobs.service_key))  # prepare() made one
    log.info("starting the trainer sidecar (jobs in %s)", jobs.resolved_root)
    return subprocess.Popen(argv, env=env)


def stop(child: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the sidecar (it hands its job back to the queue), then SIGKILL if it lingers."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()

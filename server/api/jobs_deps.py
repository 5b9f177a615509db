"""The files store and job queue an app serves the files / fine-tuning API with, opened on first use.

They live in the shared jobs database (`jobs/`), also read and written by the trainer sidecar.
The location comes from `ServerConfig.jobs`; without one (and without `LORASWAP_JOBS_DIR`) the
jobs folder sits beside the adapter store (`<store>/../jobs`), where `loraswap trainer-service`
looks by default. A store with no local folder (the cluster's `RemoteStore`, `serve --replicas`)
has no "beside": there the files and fine-tuning routes answer 400 `jobs_not_configured` until a
jobs location is set (`--jobs-dir` or `LORASWAP_JOBS_DIR`, a folder the trainer sidecar shares).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from fastapi import Request

from jobs.config import JobsConfig, jobs_config_for
from jobs.db import Database
from jobs.files import FileStore
from jobs.queue import JobQueue
from adapters.errors import LoraswapError

_lock = threading.Lock()


class NotFound(LoraswapError):
    """A file or job id the caller does not own; the message depends only on the id."""

    status, code = 404, "not_found"


class JobsNotConfigured(LoraswapError):
    """The store has no local folder to put the jobs beside, and no jobs location was given."""

    status, code = 400, "jobs_not_configured"


@dataclass(frozen=True)
class Jobs:
    config: JobsConfig
    db: Database
    files: FileStore
    queue: JobQueue


def get_jobs(request: Request) -> Jobs:
    """This app's `Jobs`, created once (the database file is migrated on first open)."""
    app_state = request.app.state
    jobs = getattr(app_state, "loraswap_jobs", None)
    if jobs is None:
        with _lock:
            jobs = getattr(app_state, "loraswap_jobs", None)
            if jobs is None:
                state = app_state.loraswap
                store_root = getattr(state.store, "root", None)
                given = state.config.jobs.root or state.config.jobs.db_path or os.environ.get("LORASWAP_JOBS_DIR")
                if store_root is None and not given:
                    raise JobsNotConfigured(
                        "the files and fine-tuning API needs a jobs location shared with the trainer "
                        "sidecar when the adapter store is remote (serve --replicas): set --jobs-dir"
                    )
                config = jobs_config_for(state.config.jobs, store_root)
                db = Database(config.database)
                jobs = Jobs(config, db, FileStore(db, config.files), JobQueue(db))
                app_state.loraswap_jobs = jobs
    return jobs

"""The jobs database: one SQLite file shared by the server and any number of sidecars.

Every operation opens its own short connection (safe across threads and processes), WAL mode
lets readers run beside the one writer, and writes that must be atomic across processes run
inside `BEGIN IMMEDIATE` (the write lock is taken before the first read, so two sidecars
cannot both see a job as queued). Migrations are a list of SQL scripts applied in order and
recorded in `PRAGMA user_version`; add one at the end, never edit an applied one.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS = [
    """
    CREATE TABLE files (
        id TEXT PRIMARY KEY, tenant TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL, lines INTEGER NOT NULL, created_at INTEGER NOT NULL
    );
    CREATE INDEX files_tenant ON files (tenant);
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,
        model TEXT NOT NULL, training_file TEXT NOT NULL, validation_file TEXT, suffix TEXT,
        seed INTEGER NOT NULL, hyperparameters TEXT NOT NULL, method TEXT NOT NULL,
        status TEXT NOT NULL, fine_tuned_model TEXT, error TEXT, trained_tokens INTEGER,
        created_at INTEGER NOT NULL, finished_at INTEGER,
        worker TEXT, lease_expires REAL, attempts INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_tenant ON jobs (tenant, seq);
    CREATE INDEX jobs_status ON jobs (status, seq);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, level TEXT NOT NULL, type TEXT NOT NULL, message TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_job ON events (job_id, seq);
    CREATE TABLE checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, epoch INTEGER NOT NULL, step_number INTEGER NOT NULL,
        path TEXT NOT NULL, metrics TEXT NOT NULL
    );
    CREATE INDEX checkpoints_job ON checkpoints (job_id, seq);
    """,
]


def new_id(prefix: str) -> str:
    """A random public id (`file-…`, `ftjob-…`): ids reveal nothing about other tenants' activity."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Database:
    """The SQLite file at `path`, migrated on open.

    Args:
        path: the database file (its folder is created); shared by server and sidecars.
        timeout: seconds a connection waits for another process's write lock.
    """

    def __init__(self, path: Path | str, timeout: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self.connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        self._migrate()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh autocommit connection; rows come back as `sqlite3.Row`."""
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # a committed job state survives power loss
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from its first statement."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, script.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number}")

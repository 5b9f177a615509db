"""The job queue: fine-tuning jobs, their events and checkpoints, and the sidecars' leases.

States: `queued` -> `running` -> `succeeded` | `failed` | `cancelled` (a queued job can be
cancelled too). A sidecar `claim`s the oldest queued job inside one `BEGIN IMMEDIATE`
transaction, so no job is handed to two sidecars; it then holds a lease it renews with
`heartbeat`. Every write a sidecar makes about a job is conditional on still holding that lease
(`status = 'running' AND worker = ?`): a sidecar that lost its job (cancelled, or declared dead
and re-queued) can no longer move it, so a job ends exactly once. `reclaim_expired` re-queues
jobs whose sidecar died (resumed from their last checkpoint) or fails them after
`max_attempts`. Tenant-facing reads take the tenant: another tenant's job is `None`.
"""

from __future__ import annotations

import builtins

import json
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.db import Database, new_id

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


class QuotaExceeded(Exception):
    """The tenant has too many active jobs."""


class NotCancellable(Exception):
    """The job has already finished."""


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    seed: int
    hyperparameters: dict
    method: dict
    status: str
    fine_tuned_model: str | None
    error: dict | None
    trained_tokens: int | None
    created_at: int
    finished_at: int | None
    worker: str | None = None
    lease_expires: float | None = None
    attempts: int = 0
    seq: int = 0

    @classmethod
    def from_row(cls, row) -> "JobRecord":
        fields = dict(row)
        for key in ("hyperparameters", "method", "error"):
            fields[key] = json.loads(fields[key]) if fields[key] else None
        return cls(**fields)


@dataclass(frozen=True)
class EventRecord:
    id: str
    job_id: str
    created_at: int
    level: str
    type: str
    message: str
    data: dict | None = None
    seq: int = 0


@dataclass(frozen=True)
class CheckpointRecord:
    id: str
    job_id: str
    created_at: int
    epoch: int
    step_number: int
    path: str
    metrics: dict = field(default_factory=dict)
    seq: int = 0


def _event(
    conn, job_id: str, message: str, type_: str = "message", data: dict | None = None, level: str = "info"
) -> None:
    conn.execute(
        "INSERT INTO events (id, job_id, created_at, level, type, message, data) VALUES (?,?,?,?,?,?,?)",
        (
            new_id("ftevent"),
            job_id,
            int(time.time()),
            level,
            type_,
            message,
            json.dumps(data) if data is not None else None,
        ),
    )


class JobQueue:
    """Jobs in the shared database. One instance per process; every call opens its own connection."""

    def __init__(self, db: Database):
        self.db = db

    # -- tenants (through the API) ---------------------------------------------------------

    def create(
        self,
        tenant: str,
        *,
        model: str,
        training_file: str,
        validation_file: str | None,
        suffix: str | None,
        seed: int,
        hyperparameters: dict,
        method: dict,
        max_active: int,
    ) -> JobRecord:
        """Queue a job for `tenant`; QuotaExceeded beyond `max_active` queued + running jobs."""
        job_id, now = new_id("ftjob"), int(time.time())
        with self.db.transaction() as conn:
            active = conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status IN (?, ?)", (tenant, *ACTIVE)
            ).fetchone()[0]
            if active >= max_active:
                raise QuotaExceeded(f"you already have {active} queued or running jobs (limit {max_active})")
            conn.execute(
                "INSERT INTO jobs (id, tenant, model, training_file, validation_file, suffix, seed, hyperparameters,"
                " method, status, created_at) VALUES (?,?,?,?,?,?,?,?,?,'queued',?)",
                (
                    job_id,
                    tenant,
                    model,
                    training_file,
                    validation_file,
                    suffix,
                    seed,
                    json.dumps(hyperparameters),
                    json.dumps(method),
                    now,
                ),
            )
            _event(conn, job_id, "Validated training file: " + training_file)
            _event(conn, job_id, "Fine-tuning job queued")
        job = self.get(tenant, job_id)
        assert job is not None  # just inserted, in this transaction's database
        return job

    def get(self, tenant: str, job_id: str) -> JobRecord | None:
        with self.db.connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return JobRecord.from_row(row) if row else None

    def get_any(self, job_id: str) -> JobRecord | None:
        """A job whoever owns it (the sidecar's and the service route's view)."""
        with self.db.connect() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord.from_row(row) if row else None

    def list(self, tenant: str, after: str | None, limit: int) -> tuple[builtins.list[JobRecord], bool]:
        """The tenant's jobs newest first, starting after job `after`; and whether more follow."""
        with self.db.connect() as conn:
            bound = _cursor(conn, "jobs", after, "tenant = ?", (tenant,))
            rows = conn.execute(
                "SELECT * FROM jobs WHERE tenant = ? AND seq < ? ORDER BY seq DESC LIMIT ?", (tenant, bound, limit + 1)
            ).fetchall()
        return [JobRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def cancel(self, tenant: str, job_id: str) -> JobRecord | None:
        """Cancel a queued or running job (its sidecar stops at its next step); None if no such job."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
            if row is None:
                return None
            if row["status"] in TERMINAL:
                raise NotCancellable(f"job {job_id} has already {row['status']}")
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, worker = NULL WHERE id = ?",
                (int(time.time()), job_id),
            )
            _event(conn, job_id, "Job cancelled")
        return self.get(tenant, job_id)

    def events(self, job_id: str, after: str | None, limit: int) -> tuple[builtins.list[EventRecord], bool]:
        """The job's events newest first (OpenAI's order), starting after event `after`."""
        with self.db.connect() as conn:
            bound = _cursor(conn, "events", after, "job_id = ?", (job_id,))
            rows = conn.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (job_id, bound, limit + 1),
            ).fetchall()
        events = [EventRecord(**{**dict(r), "data": json.loads(r["data"]) if r["data"] else None}) for r in rows]
        return events[:limit], len(rows) > limit

    def checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 100
    ) -> tuple[builtins.list[CheckpointRecord], bool]:
        """The job's checkpoints newest first."""
        with self.db.connect() as conn:
            bound = _cursor(conn, "checkpoints", after, "job_id = ?", (job_id,))
            rows = conn.execute(
                "SELECT * FROM checkpoints WHERE job_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
                (job_id, bound, limit + 1),
            ).fetchall()
        records = [CheckpointRecord(**{**dict(r), "metrics": json.loads(r["metrics"])}) for r in rows]
        return records[:limit], len(rows) > limit

    # -- sidecars ----------------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> JobRecord | None:
        """Atomically take the oldest queued job for `worker`, or None when the queue is empty."""
        with self.db.transaction() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = 'running', worker = ?, lease_expires = ?, attempts = attempts + 1"
                " WHERE id = ?",
                (worker, time.time() + lease_s, row["id"]),
            )
            _event(conn, row["id"], "Fine-tuning job started")
        return self.get_any(row["id"])

    def heartbeat(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Renew the lease; False when the job is no longer this worker's to run (cancelled, reclaimed)."""
        with self.db.transaction() as conn:
            return (
                conn.execute(
                    "UPDATE jobs SET lease_expires = ? WHERE id = ? AND status = 'running' AND worker = ?",
                    (time.time() + lease_s, job_id, worker),
                ).rowcount
                == 1
            )

    def holds(self, job_id: str, worker: str) -> bool:
        with self.db.connect() as conn:
            return (
                conn.execute(
                    "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND worker = ?", (job_id, worker)
                ).fetchone()
                is not None
            )

    def release(self, job_id: str, worker: str) -> bool:
        """Hand a running job back to the queue (its sidecar is shutting down); it resumes from its checkpoint."""
        with self.db.transaction() as conn:
            if not _holds(conn, job_id, worker):
                return False
            conn.execute(
                "UPDATE jobs SET status = 'queued', worker = NULL, lease_expires = NULL WHERE id = ?", (job_id,)
            )
            _event(
                conn,
                job_id,
                "The trainer was stopped; the job is queued again and resumes from its last checkpoint",
                level="warn",
            )
            return True

    def reclaim_expired(self, max_attempts: int) -> builtins.list[str]:
        """Jobs whose sidecar stopped renewing its lease: re-queue them, or fail them after `max_attempts`."""
        moved = []
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, attempts FROM jobs WHERE status = 'running' AND lease_expires < ?", (time.time(),)
            ).fetchall()
            for row in rows:
                moved.append(row["id"])
                if row["attempts"] >= max_attempts:
                    error = {
                        "code": "trainer_lost",
                        "param": None,
                        "message": f"the trainer running this job stopped {row['attempts']} times",
                    }
                    conn.execute(
                        "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, worker = NULL WHERE id = ?",
                        (json.dumps(error), int(time.time()), row["id"]),
                    )
                    _event(conn, row["id"], f"Job failed: {error['message']}", level="error")
                else:
                    conn.execute(
                        "UPDATE jobs SET status = 'queued', worker = NULL, lease_expires = NULL WHERE id = ?",
                        (row["id"],),
                    )
                    _event(
                        conn,
                        row["id"],
                        "The trainer running this job stopped; the job is queued again and "
                        "resumes from its last checkpoint",
                        level="warn",
                    )
        return moved

    def event(
        self,
        job_id: str,
        worker: str,
        message: str,
        type_: str = "message",
        data: dict | None = None,
        level: str = "info",
    ) -> bool:
        """Record an event while `worker` holds the job; False (nothing written) otherwise."""
        with self.db.transaction() as conn:
            if not _holds(conn, job_id, worker):
                return False
            _event(conn, job_id, message, type_, data, level)
            return True

    def add_checkpoint(self, job_id: str, worker: str, epoch: int, step: int, path: str, metrics: dict) -> bool:
        with self.db.transaction() as conn:
            if not _holds(conn, job_id, worker):
                return False
            conn.execute(
                "INSERT INTO checkpoints (id, job_id, created_at, epoch, step_number, path, metrics)"
                " VALUES (?,?,?,?,?,?,?)",
                (new_id("ftckpt"), job_id, int(time.time()), epoch, step, path, json.dumps(metrics)),
            )
            _event(
                conn,
                job_id,
                f"Checkpoint written at epoch {epoch} (step {step})",
                "metrics",
                {"epoch": epoch, "step": step, **metrics},
            )
            return True

    def latest_checkpoint(self, job_id: str) -> CheckpointRecord | None:
        found, _ = self.checkpoints(job_id, limit=1)
        return found[0] if found else None

    def finish(
        self,
        job_id: str,
        worker: str,
        status: str,
        *,
        fine_tuned_model: str | None = None,
        error: dict | None = None,
        trained_tokens: int | None = None,
        message: str | None = None,
    ) -> bool:
        """End a job `worker` holds; False (nothing changes) when it no longer holds it."""
        if status not in TERMINAL:
            raise ValueError(f"not a final status: {status}")
        with self.db.transaction() as conn:
            if not _holds(conn, job_id, worker):
                return False
            conn.execute(
                "UPDATE jobs SET status = ?, fine_tuned_model = ?, error = ?, trained_tokens = ?,"
                " finished_at = ?, worker = NULL WHERE id = ?",
                (
                    status,
                    fine_tuned_model,
                    json.dumps(error) if error else None,
                    trained_tokens,
                    int(time.time()),
                    job_id,
                ),
            )
            level = "error" if status == "failed" else "info"
            _event(conn, job_id, message or f"Job {status}", level=level)
            return True


def _holds(conn, job_id: str, worker: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND worker = ?", (job_id, worker)
        ).fetchone()
        is not None
    )


def _cursor(conn, table: str, after: str | None, scope: str, params: tuple[Any, ...]) -> int:
    """The `seq` to page below: that of item `after` in scope, or past the end when there is none."""
    if after is None:
        return 2**62
    row = conn.execute(f"SELECT seq FROM {table} WHERE id = ? AND {scope}", (after, *params)).fetchone()
    return row["seq"] if row else 2**62


def fine_tuned_name(job: JobRecord) -> str:
    """The adapter a successful job publishes, in its owner's namespace: `ft-<suffix>-<job hex>`.

    OpenAI's `ft:<base>:<org>:<suffix>:<id>` has colons, which adapter names do not allow; this
    keeps the suffix and a per-job part, so names never collide and stay under 64 characters.
    """
    tail = job.id.split("-", 1)[1]
    return f"ft-{job.suffix}-{tail}" if job.suffix else f"ft-{tail}"

"""The job queue in the shared SQLite database: atomic claims across processes, leases, exactly-once ends."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from jobs.db import Database
from jobs.files import FileStore, QuotaExceeded
from jobs.queue import JobQueue, NotCancellable
from jobs.queue import QuotaExceeded as JobQuotaExceeded

HYPER = {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0, "base_learning_rate": 2e-4}


def _queue(tmp_path) -> JobQueue:
    return JobQueue(Database(tmp_path / "jobs.db"))


def _create(queue: JobQueue, tenant: str = "alice", max_active: int = 100):
    return queue.create(
        tenant,
        model="base",
        training_file="file-x",
        validation_file=None,
        suffix=None,
        seed=0,
        hyperparameters=HYPER,
        method={},
        max_active=max_active,
    )


def _claim_all(path: str, worker: str, out) -> None:
    queue = JobQueue(Database(path))
    while (job := queue.claim(worker, lease_s=60)) is not None:
        out.put(job.id)
    out.put(None)


def test_two_processes_claiming_together_take_every_job_exactly_once(tmp_path):
    queue = _queue(tmp_path)
    created = {_create(queue).id for _ in range(40)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_claim_all, args=(str(tmp_path / "jobs.db"), f"w{i}", out)) for i in range(3)]
    for w in workers:
        w.start()
    claimed, done = [], 0
    while done < len(workers):
        item = out.get(timeout=120)
        done += item is None
        if item is not None:
            claimed.append(item)
    for w in workers:
        w.join(timeout=60)
    assert sorted(claimed) == sorted(created)  # every job once, none twice
    assert all(queue.get_any(j).status == "running" for j in created)


def test_a_worker_that_lost_its_job_can_no_longer_move_it(tmp_path):
    queue = _queue(tmp_path)
    job = _create(queue)
    assert queue.claim("w1", lease_s=60).id == job.id
    assert queue.cancel("alice", job.id).status == "cancelled"
    assert not queue.heartbeat(job.id, "w1", 60)
    assert not queue.event(job.id, "w1", "Step 1")
    assert not queue.finish(job.id, "w1", "succeeded", fine_tuned_model="x")
    assert queue.get_any(job.id).status == "cancelled"
    with pytest.raises(NotCancellable):
        queue.cancel("alice", job.id)


def test_expired_lease_requeues_then_fails_after_max_attempts(tmp_path):
    queue = _queue(tmp_path)
    job = _create(queue)
    assert queue.claim("w1", lease_s=0.01).id == job.id
    time.sleep(0.05)
    assert queue.reclaim_expired(max_attempts=2) == [job.id]
    assert queue.get_any(job.id).status == "queued"
    assert not queue.finish(job.id, "w1", "succeeded")  # the dead worker's late write is refused
    assert queue.claim("w2", lease_s=0.01).attempts == 2
    time.sleep(0.05)
    queue.reclaim_expired(max_attempts=2)
    failed = queue.get_any(job.id)
    assert failed.status == "failed" and failed.error["code"] == "trainer_lost"
    assert queue.claim("w3", lease_s=60) is None


def test_tenants_see_only_their_jobs_and_pages_follow_after(tmp_path):
    queue = _queue(tmp_path)
    mine = [_create(queue).id for _ in range(5)]
    other = _create(queue, "bob")
    assert queue.get("alice", other.id) is None and queue.cancel("alice", other.id) is None
    first, more = queue.list("alice", None, 2)
    assert [j.id for j in first] == mine[::-1][:2] and more
    second, _ = queue.list("alice", first[-1].id, 10)
    assert [j.id for j in second] == mine[::-1][2:]


def test_active_job_quota(tmp_path):
    queue = _queue(tmp_path)
    _create(queue, max_active=2)
    _create(queue, max_active=2)
    with pytest.raises(JobQuotaExceeded):
        _create(queue, max_active=2)
    _create(queue, "bob", max_active=2)  # per tenant


def test_file_quotas_and_tenancy(tmp_path):
    db = Database(tmp_path / "jobs.db")
    files = FileStore(db, tmp_path / "files")
    record = files.create("alice", "a.jsonl", "fine-tune", b"12345", 1, max_files=2, max_bytes=8)
    assert files.path(record.id).read_bytes() == b"12345"
    with pytest.raises(QuotaExceeded):
        files.create("alice", "b.jsonl", "fine-tune", b"1234", 1, max_files=2, max_bytes=8)
    assert files.get("bob", record.id) is None and not files.delete("bob", record.id)
    assert files.delete("alice", record.id) and not files.path(record.id).exists()
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == []  # no partial left behind


def test_reopening_the_database_keeps_jobs_and_schema(tmp_path):
    job = _create(_queue(tmp_path))
    assert _queue(tmp_path).get("alice", job.id).status == "queued"

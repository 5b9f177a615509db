"""Files and fine-tuning jobs over HTTP (fake engine): OpenAI shapes, bad files, quotas, tenancy, the service route.

No training happens here (no sidecar runs); tests/jobs/test_sidecar.py trains for real.
"""

from __future__ import annotations

import io
import json

import pytest

from jobs.config import JobsConfig
from tests.server.conftest import KEYS

SERVICE_KEY = "svc-0123456789abcdef"
GOOD = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Answer."}]}
    for i in range(4)
]


def jsonl(rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


@pytest.fixture
def server(make_fake_server, tmp_path):
    return make_fake_server(
        jobs=JobsConfig(
            root=tmp_path / "jobs",
            service_key=SERVICE_KEY,
            max_files_per_tenant=3,
            max_file_bytes=4096,
            max_active_jobs_per_tenant=2,
        )
    )


def _upload(client, content: bytes = jsonl(GOOD), name: str = "train.jsonl", purpose: str = "fine-tune"):
    return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, content, "application/jsonl")})


def _job(client, file_id: str, **extra):
    body = {"model": client.get("/v1/models").json()["data"][0]["id"], "training_file": file_id, **extra}
    return client.post("/v1/fine_tuning/jobs", json=body)


def test_openai_client_files_and_jobs_round_trip(server):
    client = server.openai("alice")
    uploaded = client.files.create(file=("train.jsonl", io.BytesIO(jsonl(GOOD))), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes, uploaded.filename) == (
        "file",
        "fine-tune",
        len(jsonl(GOOD)),
        "train.jsonl",
    )
    assert [f.id for f in client.files.list()] == [uploaded.id]
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).read() == jsonl(GOOD)

    base = client.models.list().data[0].id
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=uploaded.id,
        suffix="pirate",
        seed=7,
        hyperparameters={"n_epochs": 2},
        extra_body={"method": {"type": "supervised", "lora": {"rank": 4}}},
    )
    assert (job.object, job.status, job.model, job.seed, job.hyperparameters.n_epochs) == (
        "fine_tuning.job",
        "queued",
        base,
        7,
        2,
    )
    assert job.hyperparameters.batch_size == 8  # "auto" resolved
    assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert messages[0] == "Fine-tuning job queued"  # newest first, as OpenAI lists them
    assert list(client.fine_tuning.jobs.checkpoints.list(job.id)) == []
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client.files.delete(uploaded.id).deleted


def test_bad_file_is_refused_with_its_first_bad_lines(server):
    client = server.client("alice")
    rows = [GOOD[0], "{broken", {"prompt": 1, "completion": "x"}] + ["nope"] * 30
    response = _upload(client, jsonl(rows))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_file"
    assert "line 2: invalid JSON" in error["message"] and "line 3:" in error["message"]
    assert "line 21:" in error["message"] and "line 22:" not in error["message"]  # the first 20 only
    assert error["message"].startswith("train.jsonl: 32 bad line(s)") and "... and 12 more" in error["message"]
    assert client.get("/v1/files").json()["data"] == []


@pytest.mark.parametrize("purpose, name, status", [("batch", "a.jsonl", 400), ("fine-tune", "a.jsonl", 413)])
def test_purpose_and_size_are_checked(server, purpose, name, status):
    content = jsonl(GOOD) if status != 413 else jsonl(GOOD * 60)
    response = _upload(server.client("alice"), content, name, purpose)
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_file_count_quota_is_per_tenant(server):
    alice, bob = server.client("alice"), server.client("bob")
    for _ in range(3):
        assert _upload(alice).status_code == 200
    refused = _upload(alice)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert _upload(bob).status_code == 200


def test_file_names_are_metadata_only(server):
    created = _upload(server.client("alice"), name="..\\..\\etc/../passwd.jsonl").json()
    assert created["filename"] == "passwd.jsonl"
    assert server.state.store.root.parent.joinpath("jobs", "files", created["id"] + ".jsonl").is_file()


def _same_as_missing(response, missing):
    """Another tenant's id answers exactly like an unknown id (the id itself aside)."""
    assert response.status_code == missing.status_code == 404
    theirs, ours = response.json()["error"], missing.json()["error"]
    assert {k: v for k, v in theirs.items() if k != "message"} == {k: v for k, v in ours.items() if k != "message"}


def test_another_tenants_files_and_jobs_answer_like_missing_ones(server):
    alice, bob = server.client("alice"), server.client("bob")
    file_id = _upload(alice).json()["id"]
    job_id = _job(alice, file_id).json()["id"]
    fake_file, fake_job = "file-" + "0" * 24, "ftjob-" + "0" * 24
    for method, path in [("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}")]:
        _same_as_missing(bob.request(method, path.format(file_id)), bob.request(method, path.format(fake_file)))
    for method, path in [
        ("GET", "/v1/fine_tuning/jobs/{}"),
        ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
        ("GET", "/v1/fine_tuning/jobs/{}/events"),
        ("GET", "/v1/fine_tuning/jobs/{}/checkpoints"),
    ]:
        _same_as_missing(bob.request(method, path.format(job_id)), bob.request(method, path.format(fake_job)))
    theirs, unknown = _job(bob, file_id), _job(bob, fake_file)
    assert theirs.status_code == unknown.status_code == 404
    assert bob.get("/v1/files").json()["data"] == [] and bob.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert alice.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "queued"  # bob's cancel did nothing


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"model": "gpt-4o"}, "model"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters"),
        ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters"),
        ({"hyperparameters": {"batch_size": 10**9}}, "hyperparameters"),
        ({"suffix": "../x"}, "suffix"),
        ({"suffix": "x" * 33}, "suffix"),
        ({"method": {"type": "supervised", "lora": {"rank": 65}}}, "method.lora.rank"),
        ({"method": {"type": "supervised", "lora": {"target_modules": ["embed_tokens"]}}}, "method"),
        ({"method": {"type": "dpo"}}, "method"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_job_fields_are_bounded(server, extra, param):
    client = server.client("alice")
    file_id = _upload(client).json()["id"]
    response = _job(client, file_id, **extra)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


def test_active_job_quota_and_list_paging(server):
    client = server.client("alice")
    file_id = _upload(client).json()["id"]
    first, second = _job(client, file_id).json(), _job(client, file_id).json()
    assert _job(client, file_id).status_code == 429
    page = client.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in page["data"]] == [second["id"]] and page["has_more"]
    rest = client.get("/v1/fine_tuning/jobs", params={"limit": 1, "after": second["id"]}).json()
    assert [j["id"] for j in rest["data"]] == [first["id"]] and not rest["has_more"]
    client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel")
    assert _job(client, file_id).status_code == 200  # a cancelled job frees its place
    assert client.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel").status_code == 409


def _publish(server, job_id, key, tenant="alice", worker="w1"):
    import httpx

    headers = {"Authorization": f"Bearer {key}", "X-Loraswap-Tenant": tenant, "X-Loraswap-Worker": worker}
    return httpx.post(
        f"{server.url}/internal/fine_tuning/jobs/{job_id}/adapter",
        headers=headers,
        files=[("files", ("adapter_config.json", b"{}", "application/json"))],
    )


def test_only_the_service_key_publishes_and_only_on_the_publish_route(server):
    from jobs.db import Database
    from jobs.queue import JobQueue

    alice = server.client("alice")
    job_id = _job(alice, _upload(alice).json()["id"]).json()["id"]
    # tenant keys (even the owner's) cannot use the route, with or without the tenant header
    for key in KEYS.values():
        assert _publish(server, job_id, key).status_code == 401
    assert _publish(server, job_id, "wrong-" + SERVICE_KEY).status_code == 401
    # the service key is no tenant key: it reaches nothing else
    service = server.client(None)
    for path in ("/v1/models", "/v1/files", "/v1/fine_tuning/jobs", "/v1/adapters"):
        assert service.get(path, headers={"Authorization": f"Bearer {SERVICE_KEY}"}).status_code == 401
    # with the service key, only the owner and the lease holder of a running job may publish
    assert _publish(server, job_id, SERVICE_KEY).status_code == 409  # queued, not running
    queue = JobQueue(Database(server.state.store.root.parent / "jobs" / "jobs.db"))
    assert queue.claim("w1", lease_s=60).id == job_id
    assert _publish(server, job_id, SERVICE_KEY, tenant="bob").status_code == 409  # not bob's job
    assert _publish(server, job_id, SERVICE_KEY, worker="w2").status_code == 409  # not w2's lease
    refused = _publish(server, job_id, SERVICE_KEY)  # the right caller, but the adapter is invalid
    assert 400 <= refused.status_code < 500 and server.store.list("alice") == []


def test_no_service_key_configured_means_no_publishing(make_fake_server, tmp_path):
    server = make_fake_server(jobs=JobsConfig(root=tmp_path / "nokey"))
    assert _publish(server, "ftjob-" + "0" * 24, "anything-at-all-long").status_code == 401

"""The API on Ray Serve (2 engine replicas, tiny base): the openai client, affinity, uploads, deletes, failure.

References: a replica's answer for an adapter equals the other replica's (greedy, same weights) and
differs from the base's; the single-process server's behaviour for 404s and tenancy.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server.conftest import write_peft_adapter
from tests.server.conftest import upload as upload_files

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HEADER = "x-loraswap-replica"


def _chat(served, model: str, tenant: str = "alice", max_tokens: int = 8):
    raw = served.openai(tenant).chat.completions.with_raw_response.create(
        model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0
    )
    return raw.headers.get(HEADER), raw.parse()


def _base_id(served) -> str:
    return served.openai().models.list().data[0].id


@pytest.fixture(scope="module")
def adapter(ray_served, tiny_base_dir, tmp_path_factory):
    # scale 6: strong enough to change the text, under the upload check ||scaling*B@A||/||W|| <= 8
    folder = write_peft_adapter(tiny_base_dir, tmp_path_factory.mktemp("ray-adapter") / "a", seed=3, scale=6.0)
    with ray_served.client() as http:
        response = upload_files(http, "persona", folder)
    assert response.status_code in (200, 201), response.text
    return response.json()


def test_base_chat_through_the_openai_client_names_its_replica(ray_served):
    replica, completion = _chat(ray_served, _base_id(ray_served))
    assert replica
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens >= 1


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(ray_served, adapter):
    first, _ = _chat(ray_served, "persona")
    later = {_chat(ray_served, "persona")[0] for _ in range(4)}
    assert later == {first}


def test_upload_via_the_ingress_then_chat_on_every_replica(ray_served, adapter):
    # 4 concurrent requests fill both replicas (2 sequences each), so Serve spills to the second.
    base_text = _chat(ray_served, _base_id(ray_served))[1].choices[0].message.content
    results = []
    for _ in range(5):  # rounds until both replicas served it (timing decides when requests overlap)
        with ThreadPoolExecutor(4) as pool:
            results += list(pool.map(lambda _: _chat(ray_served, "persona", max_tokens=24), range(4)))
        if len({replica for replica, _ in results}) == 2:
            break
    replicas = {replica for replica, _ in results}
    texts = {completion.choices[0].message.content for _, completion in results}
    assert len(replicas) == 2, replicas
    assert len(texts) == 1 and texts != {base_text}  # the same adapter everywhere, not the base


def test_other_tenants_and_deleted_names_answer_404(ray_served, tiny_base_dir, tmp_path):
    import openai

    folder = write_peft_adapter(tiny_base_dir, tmp_path / "b", seed=4)
    with ray_served.client() as http:
        record = upload_files(http, "short-lived", folder).json()
        with pytest.raises(openai.NotFoundError):
            _chat(ray_served, "short-lived", tenant="bob")
        assert _chat(ray_served, "short-lived")[1].choices[0].message.content is not None
        assert http.delete("/v1/adapters/short-lived").status_code == 200
    with pytest.raises(openai.NotFoundError) as info:
        _chat(ray_served, "short-lived")
    assert info.value.body["code"] == "model_not_found" or "short-lived" in info.value.message
    import ray

    sha = record.get("sha256") or record.get("id")
    assert not any(ray.get(ray_served.store.has_blob.remote(s)) for s in [sha] if s and len(s) == 64)


def test_killing_a_replica_under_traffic(ray_served, adapter):
    import ray

    base = _base_id(ray_served)
    outcomes: list = []
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                replica, completion = _chat(ray_served, base, max_tokens=16)
                outcomes.append(("ok", replica))
            except Exception as exc:  # the status and envelope are checked below
                outcomes.append(("error", exc))

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = ray_served.replica_actors()[0]
    ray.kill(victim, no_restart=True)
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    errors = [e for kind, e in outcomes if kind == "error"]
    assert sum(kind == "ok" for kind, _ in outcomes) > len(errors)
    for exc in errors:  # a clear error in the OpenAI envelope, never a hang or a bare 500 without a body
        assert getattr(exc, "status_code", None) in (500, 502, 503), exc
        assert isinstance(getattr(exc, "body", None), dict) and exc.body.get("message"), exc
    deadline = time.monotonic() + 240
    while ray_served.running_replicas() < 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert ray_served.running_replicas() == 2  # Serve replaced it
    with ray_served.client() as http:
        assert http.get("/ready").status_code == 200
    assert _chat(ray_served, "persona")[1].choices[0].message.content is not None


def test_app_builder_for_serve_run_and_kuberay_builds_the_application(ray_served, tiny_base_dir):
    from ray.serve import Application

    from server.cluster.ingress import app_builder

    app = app_builder(
        {
            "replicas": 1,
            "store": str(tiny_base_dir.parent / "builder-store"),
            "base": str(tiny_base_dir),
            "quant": "none",
            "device": "cpu",
        }
    )
    assert isinstance(app, Application)

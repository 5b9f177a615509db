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


def _on_both_replicas(served, model: str) -> list:
    # 4 concurrent requests fill both replicas (2 sequences each), so the router spills to the second.
    results: list = []
    for _ in range(5):  # rounds until both replicas served it (timing decides when requests overlap)
        with ThreadPoolExecutor(4) as pool:
            results += list(pool.map(lambda _: _chat(served, model, max_tokens=24), range(4)))
        if len({replica for replica, _ in results}) == 2:
            break
    return results


def _replicas_handle():
    from ray import serve

    return serve.get_deployment_handle("EngineReplica", app_name="loraswap")


def test_our_router_routes_around_a_replica_a_request_must_avoid(ray_served, adapter):
    """Serve's own router knows nothing of `avoid` (the retry after a lost replica): ours never
    picks an avoided replica while another runs, for the base and for an adapter it holds."""
    from server.engine.types import SamplingParams

    names = ray_served.replica_names()
    assert len(names) == 2
    handle = _replicas_handle()
    record = ray_served.client().get("/v1/adapters/persona").json()
    for avoided in names:
        for model_id in ("", record["id"], "", record["id"]):
            response = handle.options(stream=True, multiplexed_model_id=model_id).generate.remote(
                f"avoid-{avoided}-{model_id}", [1, 2, 3], SamplingParams(max_tokens=1, temperature=0), "alice",
                avoid=(avoided,),
            )  # fmt: skip
            served = {replica for replica, _, _ in response}
            assert served == set(names) - {avoided}


def test_upload_via_the_ingress_then_chat_on_every_replica(ray_served, adapter):
    base_text = _chat(ray_served, _base_id(ray_served))[1].choices[0].message.content
    results = _on_both_replicas(ray_served, "persona")
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


def test_a_stream_names_its_replica_too(ray_served, adapter):
    body = {"model": "persona", "messages": QUESTION, "max_tokens": 4, "stream": True}
    with ray_served.client() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers.get(HEADER)
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"role": "assistant"' in lines[0]


def _refused_everywhere(handle, *serves_args) -> None:
    """Every replica refuses `serves(*serves_args)` with AdapterNotFound, once the asynchronous
    collection and forget broadcast have run (120 s hang guard)."""
    from adapters.errors import AdapterNotFound

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        refusals = handle.broadcast("serves", *serves_args).results(timeout_s=120, return_exceptions=True)
        if all(isinstance(r, Exception) for r in refusals):
            break
        time.sleep(0.5)
    assert refusals and all(
        isinstance(r, AdapterNotFound) or isinstance(getattr(r, "cause", None), AdapterNotFound) for r in refusals
    ), refusals


def test_a_delete_reaches_every_replica(ray_served, tiny_base_dir, tmp_path):
    """Warm the adapter on both replicas, delete it: once its blob is gone every replica refuses
    its content id (Serve's LRU would still hand out the old copy) and none lists it resident."""
    import ray

    folder = write_peft_adapter(tiny_base_dir, tmp_path / "doomed", seed=5, scale=6.0)
    with ray_served.client() as http:
        record = upload_files(http, "doomed", folder).json()
    assert len({replica for replica, _ in _on_both_replicas(ray_served, "doomed")}) == 2
    content_id = record["id"]
    handle = _replicas_handle()
    assert sorted(handle.broadcast("serves", content_id).results(timeout_s=120)) == sorted(ray_served.replica_names())
    with ray_served.client() as http:
        assert http.delete("/v1/adapters/doomed").status_code == 200
    import openai

    with pytest.raises(openai.NotFoundError):  # the name is gone at once, on whichever replica
        _chat(ray_served, "doomed")
    _refused_everywhere(handle, content_id)
    assert not ray.get(ray_served.store.has_blob.remote(record["sha256"]))
    for report in handle.broadcast("ready").results(timeout_s=120):
        assert content_id not in report["stats"].adapters, report["replica"]


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
    for exc in errors:  # a typed, retryable error in the OpenAI envelope: never a hang, never a 500
        assert getattr(exc, "status_code", None) == 503, exc
        assert isinstance(getattr(exc, "body", None), dict) and exc.body.get("message"), exc
        assert exc.response.headers.get("retry-after"), exc
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


def test_a_mix_on_the_cluster_equals_its_saved_cat_merge(ray_served, adapter, tiny_base_dir, tmp_path):
    """A per-request mix reaches a replica as its id plus its parts' content ids; the replica builds
    it from the store's blobs. Reference: the `cat` merge of the same parts and weights, saved and
    served as one adapter (greedy, fp32: equal text), on each replica. Deleting a part ends the
    mix: 404 at the ingress, and every replica that built it refuses its id."""
    import openai

    from adapters.mix import canonical_parts, mix_id
    from server.engine.types import SamplingParams

    folder = write_peft_adapter(tiny_base_dir, tmp_path / "mix-part", seed=6, scale=6.0)
    parts = [{"name": "persona", "weight": 0.7}, {"name": "mix-part", "weight": 0.3}]
    with ray_served.client() as http:
        assert upload_files(http, "mix-part", folder).status_code in (200, 201)
        merged = http.post("/v1/adapters/merge", json={"name": "mix-saved", "method": "cat", "adapters": parts})
        assert merged.status_code in (200, 201), merged.text
        ids = {p["name"]: http.get(f"/v1/adapters/{p['name']}").json()["id"] for p in parts}
        saved_id = http.get("/v1/adapters/mix-saved").json()["id"]
    base = _base_id(ray_served)

    def mixed():
        return ray_served.openai().chat.completions.with_raw_response.create(
            model=base, messages=QUESTION, max_tokens=8, temperature=0, extra_body={"adapters": parts}
        )

    first = mixed()
    text = first.parse().choices[0].message.content
    assert text == _chat(ray_served, "mix-saved")[1].choices[0].message.content
    assert text != _chat(ray_served, base)[1].choices[0].message.content
    assert {mixed().headers.get(HEADER) for _ in range(2)} == {first.headers.get(HEADER)}  # affinity by mix id

    # every replica (forced with `avoid`) builds the mix and answers with the saved merge's tokens
    mix = tuple(canonical_parts([(ids[p["name"]], p["weight"]) for p in parts]))
    handle, names = _replicas_handle(), ray_served.replica_names()
    for avoided in names:
        answers = []
        for model_id, extra in ((mix_id(mix), {"mix": mix}), (saved_id, {})):
            response = handle.options(stream=True, multiplexed_model_id=model_id).generate.remote(
                f"mix-{avoided}-{model_id}", [1, 2, 3, 4], SamplingParams(max_tokens=6, temperature=0), "alice",
                avoid=(avoided,), **extra,
            )  # fmt: skip
            answers.append([event.token_id for _, event, _ in response if event is not None])
        assert answers[0] == answers[1], avoided

    with ray_served.client() as http:
        assert http.delete("/v1/adapters/mix-part").status_code == 200
    with pytest.raises(openai.NotFoundError):
        mixed()
    _refused_everywhere(handle, mix_id(mix), mix)

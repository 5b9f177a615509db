"""Tenancy and admission: API keys -> tenants, namespaces that answer like missing names, 429, 503."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from server.limits import Limits
from server.api.deps import tenant_for_key
from tests.server.conftest import KEYS, upload
from tests.server.live import wait_until

USER = [{"role": "user", "content": "hello"}]


def test_tenant_for_key_compares_every_key():
    keys = (("alice", "k1"), ("bob", "k2"))
    assert tenant_for_key(keys, "k1") == "alice"
    assert tenant_for_key(keys, "k2") == "bob"
    assert tenant_for_key(keys, "k") is None and tenant_for_key(keys, "k1x") is None


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {KEYS['alice']}x"},
    ],
)
def test_missing_or_wrong_key_is_401(fake_server, headers):
    http = httpx.Client(base_url=fake_server.url, headers=headers)
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/adapters"),
        ("POST", "/tokenize"),
    ):
        response = http.request(method, path, json={"model": "x", "messages": USER})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
    http.close()


def test_no_keys_means_auth_off_and_tenant_default(make_fake_server, peft_adapters):
    server = make_fake_server(api_keys=())
    http = server.client(tenant=None)
    assert upload(http, "mine", peft_adapters["a"]).status_code == 201
    models = server.openai().models.list()  # any key is accepted when auth is off
    assert [(m.id, m.owned_by) for m in models.data][1:] == [("mine", "default")]


def test_another_tenants_adapter_answers_exactly_like_a_missing_one(fake_server, peft_adapters):
    alice, bob = fake_server.client("alice"), fake_server.client("bob")
    assert upload(alice, "secret", peft_adapters["a"]).status_code == 201

    def same(request_for):
        theirs, missing = request_for("secret"), request_for("never-existed")
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json() == json.loads(missing.text.replace("never-existed", "secret"))

    same(lambda name: bob.post("/v1/chat/completions", json={"model": name, "messages": USER}))
    same(lambda name: bob.post("/tokenize", json={"model": name, "messages": USER}))
    same(lambda name: bob.get(f"/v1/adapters/{name}"))
    same(lambda name: bob.delete(f"/v1/adapters/{name}"))
    same(lambda name: bob.post(f"/v1/adapters/{name}/pin"))
    same(lambda name: bob.get(f"/v1/models/{name}"))
    assert bob.get("/v1/adapters").json()["data"] == []
    assert [m["id"] for m in bob.get("/v1/models").json()["data"]] == [fake_server.state.base_id]
    # alice still has it, untouched by bob's delete
    assert alice.get("/v1/adapters/secret").status_code == 200
    ok = alice.post("/v1/chat/completions", json={"model": "secret", "messages": USER, "max_tokens": 2})
    assert ok.status_code == 200


def test_same_name_in_two_namespaces_are_two_adapters(fake_server, peft_adapters):
    alice, bob = fake_server.client("alice"), fake_server.client("bob")
    a = upload(alice, "shared-name", peft_adapters["a"]).json()
    b = upload(bob, "shared-name", peft_adapters["b"]).json()
    assert a["sha256"] != b["sha256"]
    r = alice.post("/v1/chat/completions", json={"model": "shared-name", "messages": USER, "max_tokens": 1}).json()
    assert fake_server.engine.adapters_seen[r["id"]] == a["id"]
    r = bob.post("/v1/chat/completions", json={"model": "shared-name", "messages": USER, "max_tokens": 1}).json()
    assert fake_server.engine.adapters_seen[r["id"]] == b["id"]


def _start_streams(server, tenant: str, count: int) -> list:
    """Open `count` streaming requests and wait until the engine runs them all."""
    responses = []
    for _ in range(count):
        http = server.client(tenant)
        body = {"model": server.state.base_id, "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}
        response = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        assert response.status_code == 200
        responses.append(response)
    return responses


def test_per_tenant_limit_is_429_with_retry_after(make_fake_server):
    server = make_fake_server(max_concurrent_per_tenant=2, retry_after_s=3)
    server.engine.gate.clear()  # hold every step so the streams stay in flight
    streams = _start_streams(server, "alice", 2)
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 2}
    refused = server.client("alice").post("/v1/chat/completions", json=body)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    server.engine.gate.set()
    assert server.client("bob").post("/v1/chat/completions", json=body).status_code == 200  # others unaffected
    for response in streams:
        response.close()
    assert wait_until(lambda: server.state.admission.total == 0)
    assert server.client("alice").post("/v1/chat/completions", json=body).status_code == 200


def test_full_queue_is_503_with_retry_after(make_fake_server):
    # Each tenant may hold the whole capacity here, so the global bound is what refuses.
    server = make_fake_server(
        max_num_seqs=1, max_queue=1, max_concurrent_per_tenant=10, limits=Limits(tenant_queue_share=1.0)
    )
    server.engine.gate.clear()
    streams = _start_streams(server, "alice", 1) + _start_streams(server, "bob", 1)
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 2}
    refused = server.client("bob").post("/v1/chat/completions", json=body)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "server_overloaded"
    server.engine.gate.set()
    for response in streams:
        response.close()
    assert wait_until(lambda: server.state.admission.total == 0)
    assert server.client("bob").post("/v1/chat/completions", json=body).status_code == 200


def test_concurrent_requests_all_complete(fake_server):
    results = []

    def one(tenant):
        http = fake_server.client(tenant)
        r = http.post(
            "/v1/chat/completions", json={"model": fake_server.state.base_id, "messages": USER, "max_tokens": 8}
        )
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("alice", "bob") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert fake_server.state.admission.total == 0 and not fake_server.engine.running

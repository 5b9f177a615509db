"""Bounded shared resources on the HTTP side: the upload gate (429 per tenant, 503 overall, both
with Retry-After, decided before the body is read), uploads validated in their own pool, merges
in their own bounded pool behind their own gate, and each tenant's share of the admission queue.
Each time the other tenant keeps working."""

from __future__ import annotations

import socket
import threading

import pytest

from server.api import adapters as adapters_api
from server.api import merge as merge_api
from server.limits import Limits
from tests.server.conftest import KEYS, upload, write_peft_adapter
from tests.server.live import wait_until

USER = [{"role": "user", "content": "hi"}]
GUARD_S = 30


def _slow_upload(server, tenant: str) -> socket.socket:
    """An upload whose body never finishes: it holds an upload slot while the edge waits for it."""
    port = server.live.port
    sock = socket.create_connection(("127.0.0.1", port), timeout=GUARD_S)
    head = (
        f"POST /v1/adapters HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[tenant]}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n--x\r\n"
    )
    sock.sendall(head.encode())
    return sock


def test_upload_gate_is_429_per_tenant_then_503_overall(make_fake_server, peft_adapters):
    server = make_fake_server(limits=Limits(max_concurrent_uploads=2, max_concurrent_uploads_per_tenant=1))
    gate = server.state.pools.uploads
    held = _slow_upload(server, "alice")
    try:
        assert wait_until(lambda: gate.held == 1)
        second = upload(server.client("alice"), "two", peft_adapters["a"])
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "rate_limit_exceeded"
        assert upload(server.client("bob"), "fine", peft_adapters["a"]).status_code == 201
        bob_held = _slow_upload(server, "bob")
        try:
            assert wait_until(lambda: gate.held == 2)
            full = upload(server.client("alice"), "three", peft_adapters["a"])
            assert full.status_code == 429  # alice is still at her own limit
        finally:
            bob_held.close()
    finally:
        held.close()
    assert wait_until(lambda: gate.held == 0)  # a client that goes away releases its slot
    assert upload(server.client("alice"), "later", peft_adapters["a"]).status_code == 201


def test_upload_gate_full_overall_is_503(make_fake_server, peft_adapters):
    server = make_fake_server(limits=Limits(max_concurrent_uploads=1, max_concurrent_uploads_per_tenant=1))
    held = _slow_upload(server, "alice")
    try:
        assert wait_until(lambda: server.state.pools.uploads.held == 1)
        refused = upload(server.client("bob"), "x", peft_adapters["a"])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        chat = server.client("bob").post(
            "/v1/chat/completions", json={"model": server.state.base_id, "messages": USER, "max_tokens": 2}
        )
        assert chat.status_code == 200  # uploads are bounded apart from generation
    finally:
        held.close()


def _hold(module, attribute: str, monkeypatch):
    """Replace `module.attribute` by a wrapper that blocks until released; returns (entered, release)."""
    original = getattr(module, attribute)
    entered, release = threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(GUARD_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attribute, held)
    return entered, release


def test_validation_runs_off_the_event_loop(fake_server, peft_adapters, monkeypatch):
    entered, release = _hold(adapters_api, "_validate", monkeypatch)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(r=upload(fake_server.client("alice"), "slow", peft_adapters["a"]))
    )
    worker.start()
    try:
        assert entered.wait(GUARD_S)
        assert fake_server.client(tenant=None).get("/health").status_code == 200
        assert fake_server.client("bob").get("/v1/adapters").status_code == 200
        assert "r" not in result
    finally:
        release.set()
        worker.join(GUARD_S)
    assert result["r"].status_code == 201


def _merge_body(name: str, sources: list[str]) -> dict:
    return {"name": name, "method": "linear", "adapters": [{"name": s, "weight": 0.5} for s in sources]}


def test_merges_have_their_own_gate_one_per_tenant(fake_server, peft_adapters, monkeypatch):
    for tenant in ("alice", "bob"):
        upload(fake_server.client(tenant), "a", peft_adapters["a"])
        upload(fake_server.client(tenant), "b", peft_adapters["a"])
    entered, release = _hold(merge_api, "_merge_into", monkeypatch)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            r=fake_server.client("alice").post("/v1/adapters/merge", json=_merge_body("ab", ["a", "b"]))
        )
    )
    worker.start()
    try:
        assert entered.wait(GUARD_S)
        second = fake_server.client("alice").post("/v1/adapters/merge", json=_merge_body("ab2", ["a", "b"]))
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        # an upload is not queued behind the merge: its pool and gate are its own
        assert upload(fake_server.client("bob"), "c", peft_adapters["b"]).status_code == 201
        release.set()
        bob = fake_server.client("bob").post("/v1/adapters/merge", json=_merge_body("ab", ["a", "b"]))
        assert bob.status_code == 201, bob.text
    finally:
        release.set()
        worker.join(GUARD_S)
    assert result["r"].status_code == 201, result["r"].text


def test_merge_weights_are_bounded(fake_server, peft_adapters):
    upload(fake_server.client(), "a", peft_adapters["a"])
    body = {"name": "m", "method": "linear", "adapters": [{"name": "a", "weight": 1e300}]}
    response = fake_server.client().post("/v1/adapters/merge", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "adapters"


def test_one_tenant_cannot_fill_the_admission_queue(make_fake_server):
    server = make_fake_server(max_num_seqs=2, max_queue=2, max_concurrent_per_tenant=16)  # share 0.5 -> 2 each
    base = server.state.base_id
    body = {"model": base, "messages": USER, "max_tokens": 4, "ignore_eos": True, "stream": True}
    server.engine.gate.clear()
    alice = server.client("alice")
    streams = [
        alice.send(alice.build_request("POST", "/v1/chat/completions", json=body), stream=True) for _ in range(2)
    ]
    try:
        assert all(stream.status_code == 200 for stream in streams)
        refused = alice.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        bob = server.client("bob")
        bob_stream = bob.send(bob.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        assert bob_stream.status_code == 200  # the queue still has room for another tenant
        server.engine.gate.set()
        assert "data: [DONE]" in "".join(bob_stream.iter_text())
        bob_stream.close()
    finally:
        server.engine.gate.set()
        for stream in streams:
            stream.close()


@pytest.fixture(scope="module")
def churn_adapters(tiny_base_dir, tmp_path_factory):
    """Four distinct adapters: one name re-uploaded past the store's default 3 kept versions."""
    root = tmp_path_factory.mktemp("churn")
    return [write_peft_adapter(tiny_base_dir, root / str(seed), seed=seed) for seed in range(10, 14)]


def test_a_pruned_version_loses_its_pin_and_leaves_the_engine(fake_server, churn_adapters):
    server = fake_server
    alice = server.client("alice")
    old = upload(alice, "churn", churn_adapters[0]).json()["id"]
    assert alice.post("/v1/adapters/churn/pin").json()["pinned"] is True
    for version, adapter in enumerate(churn_adapters[1:], start=2):
        response = upload(alice, "churn", adapter)
        assert response.status_code == 201 and response.json()["version"] == version
    # version 1 is no longer kept: its pin goes, and so does the engine's copy once its blob is gone
    assert old not in server.engine.pinned
    assert wait_until(lambda: old in server.engine.forgotten)
    assert not any(blob.name.startswith(old) for blob in (server.store.root / "blobs").iterdir())


def test_a_pruned_content_still_named_elsewhere_stays(fake_server, churn_adapters):
    server = fake_server
    alice, bob = server.client("alice"), server.client("bob")
    old = upload(alice, "churn", churn_adapters[0]).json()["id"]
    assert upload(bob, "same-bytes", churn_adapters[0]).json()["id"] == old
    for adapter in churn_adapters[1:]:
        upload(alice, "churn", adapter)
    assert wait_until(lambda: server.state._gc_task is not None and server.state._gc_task.done())
    assert old not in server.engine.forgotten  # bob's name still points at those bytes
    chat = bob.post("/v1/chat/completions", json={"model": "same-bytes", "messages": USER, "max_tokens": 2})
    assert chat.status_code == 200

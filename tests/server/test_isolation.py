"""Information isolation on the HTTP side: per-(tenant, content) pins and residency, identical bytes
that reveal nothing, metrics without adapter names or ids, errors without paths or reprs, and an
engine failure of one sequence that ends only that tenant's request with the engine's status."""

from __future__ import annotations

import json
import threading

import pytest

from server.engine.types import AdapterRef, EngineStats, FoldView
from tests.server.conftest import upload
from tests.server.live import wait_until

USER = [{"role": "user", "content": "hi"}]
# The fields of a card that describe the caller's view of the adapter rather than its content.
VIEW = ("object", "residency", "folded", "pinned", "version", "template")


def _view(card: dict) -> dict:
    return {key: card[key] for key in VIEW}


def test_uploading_another_tenants_bytes_answers_like_fresh_bytes(fake_server, peft_adapters):
    alice, bob = fake_server.client("alice"), fake_server.client("bob")
    assert upload(alice, "mine", peft_adapters["a"]).status_code == 201
    assert alice.post("/v1/adapters/mine/pin").json()["pinned"] is True
    chat = alice.post("/v1/chat/completions", json={"model": "mine", "messages": USER, "max_tokens": 2})
    assert chat.status_code == 200
    assert alice.get("/v1/adapters/mine").json()["residency"] == "device"  # alice sees her own state

    fresh = upload(bob, "fresh", peft_adapters["b"])
    same = upload(bob, "copy", peft_adapters["a"])
    assert same.status_code == fresh.status_code == 201
    assert (
        _view(same.json())
        == _view(fresh.json())
        == {
            "object": "adapter",
            "residency": "disk",
            "folded": False,
            "pinned": False,
            "version": 1,
            "template": "unknown",
        }
    )
    for path in ("/v1/adapters/copy", "/v1/models/copy"):
        card = bob.get(path).json()
        assert (card["residency"], card["folded"], card["pinned"]) == ("disk", False, False), card


def test_one_tenants_unpin_never_removes_anothers_pin(fake_server, peft_adapters):
    alice, bob = fake_server.client("alice"), fake_server.client("bob")
    adapter_id = upload(alice, "shared", peft_adapters["a"]).json()["id"]
    assert upload(bob, "shared", peft_adapters["a"]).json()["id"] == adapter_id  # same content, same blob
    alice.post("/v1/adapters/shared/pin")
    unpinned = bob.post("/v1/adapters/shared/unpin")
    assert unpinned.status_code == 200 and unpinned.json()["pinned"] is False
    assert fake_server.engine.pins[adapter_id] == {"alice"}
    assert alice.get("/v1/adapters/shared").json()["pinned"] is True
    assert bob.get("/v1/adapters/shared").json()["pinned"] is False
    alice.post("/v1/adapters/shared/unpin")
    assert adapter_id not in fake_server.engine.pinned


class _LegacyEngine:
    """An engine from before the contract: pins keyed by content id alone, no tenant_residency."""

    def __init__(self):
        self.pinned: set[str] = set()
        self.calls: list[tuple] = []

    def pin(self, ref: AdapterRef):
        self.calls.append(("pin", ref.id))
        self.pinned.add(ref.id)

    def unpin(self, adapter_id: str):
        self.calls.append(("unpin", adapter_id))
        self.pinned.discard(adapter_id)

    def stats(self) -> EngineStats:
        pinned = tuple(sorted(self.pinned))
        return EngineStats(
            adapters={aid: "device" for aid in pinned}, fold=FoldView(folded=next(iter(pinned), None), pinned=pinned)
        )


def test_metrics_carry_no_adapter_names_or_ids(fake_server, peft_adapters):
    alice = fake_server.client("alice")
    adapter_id = upload(alice, "secret-project", peft_adapters["a"]).json()["id"]
    alice.post("/v1/adapters/secret-project/pin")
    alice.post("/v1/chat/completions", json={"model": "secret-project", "messages": USER, "max_tokens": 2})
    text = fake_server.client("admin").get("/metrics").text
    assert "secret-project" not in text and adapter_id not in text
    assert "loraswap_engine_pinned_adapters 1.0" in text


def test_an_unexpected_error_shows_no_path_or_repr_and_names_the_request_id(fake_server, caplog):
    def broken(tenant, model):
        raise RuntimeError("/var/lib/loraswap/blobs/deadbeef is gone")

    fake_server.state.resolve_model = broken
    response = fake_server.client().post("/v1/chat/completions", json={"model": "x", "messages": USER, "max_tokens": 1})
    assert response.status_code == 500
    message = response.json()["error"]["message"]
    assert "/var/lib" not in message and "RuntimeError" not in message
    request_id = response.headers["x-request-id"]
    assert request_id in message
    assert any(request_id in record.getMessage() for record in caplog.records)  # the detail is in the log


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_fault_of_one_sequence_ends_only_that_request(fake_server, stream):
    base = fake_server.state.base_id
    fake_server.engine.gate.clear()
    bob_result = {}

    def bob():
        body = {"model": base, "messages": USER, "max_tokens": 8, "ignore_eos": True}
        bob_result["response"] = fake_server.client("bob").post("/v1/chat/completions", json=body)

    worker = threading.Thread(target=bob)
    worker.start()
    assert wait_until(lambda: len(fake_server.engine.running) == 1)
    fake_server.engine.fail_next["alice"] = ("the output of this request is not finite", "non_finite_output", 422)
    alice = fake_server.client("alice")
    body = {"model": base, "messages": USER, "max_tokens": 8, "stream": stream}
    if stream:
        with alice.stream("POST", "/v1/chat/completions", json=body) as response:
            assert wait_until(lambda: len(fake_server.engine.running) == 2)
            fake_server.engine.gate.set()
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        threading.Timer(
            0, lambda: wait_until(lambda: len(fake_server.engine.running) == 2) and fake_server.engine.gate.set()
        ).start()
        response = alice.post("/v1/chat/completions", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
    assert error["code"] == "non_finite_output" and "not finite" in error["message"]
    worker.join(30)
    assert bob_result["response"].status_code == 200
    assert bob_result["response"].json()["usage"]["completion_tokens"] == 8


def test_an_engine_error_that_names_a_path_reaches_the_client_without_it(fake_server):
    base = fake_server.state.base_id
    reason = "could not load /srv/loraswap/blobs/ab12/adapter_model.safetensors in time"
    fake_server.engine.fail_next["alice"] = (reason, "adapter_load_failed", 503)
    response = fake_server.client("alice").post(
        "/v1/chat/completions", json={"model": base, "messages": USER, "max_tokens": 2}
    )
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "adapter_load_failed" and "/srv" not in error["message"] and "<path>" in error["message"]
    ok = fake_server.client("bob").post("/v1/chat/completions", json={"model": base, "messages": USER, "max_tokens": 2})
    assert ok.status_code == 200

"""`/v1/adapters` over HTTP: publish semantics, listing, residency, delete in flight, pin / unpin,
and the template contract (422 naming the trained template; allowed with the flag; "unknown")."""

from __future__ import annotations

import json
import shutil

from adapters.provenance import Provenance, write_provenance
from tests.server.conftest import upload
from tests.server.live import wait_until

USER = [{"role": "user", "content": "hello"}]


def test_upload_is_201_then_200_for_the_same_content_then_a_new_version(fake_server, peft_adapters):
    http = fake_server.client()
    first = upload(http, "helper", peft_adapters["a"])
    assert first.status_code == 201, first.text
    card = first.json()
    assert card["object"] == "adapter" and card["name"] == "helper" and card["version"] == 1
    assert card["rank"] == 4 and len(card["sha256"]) == 64 and card["template"] == "unknown"
    assert card["target_modules"] == sorted(card["target_modules"]) and card["target_modules"]
    assert {"q_proj", "v_proj"} == {m.rsplit(".", 1)[-1] for m in card["target_modules"]}

    again = upload(http, "helper", peft_adapters["a"])
    assert again.status_code == 200 and again.json()["id"] == card["id"] and again.json()["version"] == 1

    other = upload(http, "helper", peft_adapters["b"])
    assert other.status_code == 201
    assert other.json()["version"] == 2 and other.json()["id"] != card["id"] and other.json()["rank"] == 8

    listed = http.get("/v1/adapters").json()
    assert [(a["name"], a["version"]) for a in listed["data"]] == [("helper", 2)]
    assert http.get("/v1/adapters/helper").json()["sha256"] == other.json()["sha256"]
    r = http.post("/v1/chat/completions", json={"model": "helper", "messages": USER, "max_tokens": 1}).json()
    assert fake_server.engine.adapters_seen[r["id"]] == other.json()["id"]


def test_models_list_shows_adapters_with_residency_and_fold_state(fake_server, peft_adapters):
    http = fake_server.client()
    card = upload(http, "styled", peft_adapters["a"]).json()
    models = fake_server.openai().models.list().data
    assert [m.id for m in models] == [fake_server.state.base_id, "styled"]
    adapter = models[1].model_dump()
    assert adapter["owned_by"] == "alice" and adapter["residency"] == "disk" and adapter["folded"] is False
    assert adapter["sha256"] == card["sha256"] and adapter["parent"] == fake_server.state.base_id

    pinned = http.post("/v1/adapters/styled/pin")
    assert pinned.status_code == 200 and card["id"] in fake_server.engine.pinned
    assert pinned.json()["residency"] == "device" and pinned.json()["pinned"] is True
    adapter = fake_server.openai().models.list().data[1].model_dump()
    assert adapter["folded"] is True and adapter["residency"] == "device"
    assert http.post("/v1/adapters/styled/unpin").json()["pinned"] is False
    assert card["id"] not in fake_server.engine.pinned


def test_delete_lets_requests_in_flight_finish_and_new_ones_get_404(fake_server, peft_adapters):
    http = fake_server.client()
    card = upload(http, "doomed", peft_adapters["a"]).json()
    blob = fake_server.store.adapter_dir(fake_server.store.get("alice", "doomed"))
    fake_server.engine.gate.clear()
    body = {"model": "doomed", "messages": USER, "max_tokens": 5, "ignore_eos": True, "stream": True}
    stream = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert stream.status_code == 200
    assert wait_until(lambda: len(fake_server.engine.running) == 1)

    deleted = fake_server.client().delete("/v1/adapters/doomed")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": card["id"],
        "object": "adapter.deleted",
        "name": "doomed",
        "deleted": True,
    }
    new = fake_server.client().post("/v1/chat/completions", json={"model": "doomed", "messages": USER})
    assert new.status_code == 404 and new.json()["error"]["code"] == "model_not_found"
    assert fake_server.client().get("/v1/adapters").json()["data"] == []
    assert blob.is_dir() and not fake_server.engine.forgotten  # still needed by the request in flight

    fake_server.engine.gate.set()
    text = "".join(stream.iter_text())
    stream.close()
    assert '"finish_reason": "length"' in text and text.rstrip().endswith("data: [DONE]")
    assert wait_until(lambda: fake_server.engine.forgotten == [card["id"]])
    assert not blob.exists()
    assert fake_server.client().delete("/v1/adapters/doomed").status_code == 404


def test_delete_keeps_content_another_name_still_uses(fake_server, peft_adapters):
    http = fake_server.client()
    upload(http, "one", peft_adapters["a"])
    upload(http, "two", peft_adapters["a"])
    assert http.delete("/v1/adapters/one").status_code == 200
    assert fake_server.engine.forgotten == []  # "two" still points at the same content
    ok = http.post("/v1/chat/completions", json={"model": "two", "messages": USER, "max_tokens": 1})
    assert ok.status_code == 200


def _with_provenance(source, target, **fields):
    shutil.copytree(source, target)
    write_provenance(Provenance(**fields), target)
    return target


def test_template_contract(fake_server, peft_adapters, tmp_path):
    http = fake_server.client()
    served = fake_server.state.base_info.template_sha256
    trained = "ab" * 32
    off_template = _with_provenance(peft_adapters["a"], tmp_path / "off", chat_template_sha256=trained)

    refused = upload(http, "off", off_template)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "template_mismatch" and trained in error["message"] and served in error["message"]
    assert http.get("/v1/adapters").json()["data"] == []

    allowed = upload(http, "off", off_template, allow_template_mismatch=True)
    assert allowed.status_code == 201 and allowed.json()["template"] == trained

    on_template = _with_provenance(peft_adapters["b"], tmp_path / "on", chat_template_sha256=served)
    accepted = upload(http, "on", on_template)
    assert accepted.status_code == 201 and accepted.json()["template"] == served

    bare = upload(http, "bare", peft_adapters["a"])
    assert bare.status_code == 201 and bare.json()["template"] == "unknown"
    listed = {a["name"]: a["template"] for a in http.get("/v1/adapters").json()["data"]}
    assert listed == {"bare": "unknown", "off": trained, "on": served}


def test_upload_then_chat_metrics_are_exposed(fake_server, peft_adapters):
    http = fake_server.client()
    upload(http, "counted", peft_adapters["a"])
    http.post("/v1/chat/completions", json={"model": "counted", "messages": USER, "max_tokens": 3})
    assert http.get("/metrics").status_code == 401  # a tenant's key is not the admin key
    text = fake_server.client("admin").get("/metrics").text
    assert 'loraswap_requests_total{kind="adapter",status="length",tenant="alice"} 1.0' in text
    assert 'loraswap_generation_tokens_total{kind="adapter",tenant="alice"} 3.0' in text
    assert "counted" not in text  # adapter names are the tenant's own: never a label
    assert 'loraswap_adapter_uploads_total{status="201"} 1.0' in text
    assert "loraswap_time_to_first_token_seconds_count" in text
    assert "loraswap_engine_running 0.0" in text


def test_health_and_ready(fake_server):
    http = fake_server.client(tenant=None)
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    fake_server.state.ready = False
    assert http.get("/ready").status_code == 503


def test_invalid_provenance_json_in_upload(fake_server, peft_adapters):
    files = [("files", (p.name, p.read_bytes())) for p in sorted(peft_adapters["a"].iterdir())]
    files.append(("files", ("loraswap.json", json.dumps([1, 2]).encode())))
    response = upload(fake_server.client(), "prov", files=files)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_provenance"

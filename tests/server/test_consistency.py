"""Consistency of deletes on the HTTP side: in-use accounting per (tenant, version), so a DELETE
after a re-upload waits for requests still queued on the old version; merges hold their sources;
garbage collection (store with `collect_garbage(in_use)`) skips blobs in use and runs again
when their users leave; the engine forgets content only once its blob is gone."""

from __future__ import annotations

import threading

from adapters.store import AdapterStore
from server.api import merge as merge_api
from server.app import create_app
from server.settings import ServerConfig
from tests.server.conftest import ADMIN_KEY, KEYS, FakeServer, upload
from tests.server.fake_engine import FakeEngine
from tests.server.live import LiveServer, wait_until

USER = [{"role": "user", "content": "hi"}]
GUARD_S = 30


def test_delete_after_a_reupload_waits_for_requests_on_the_old_version(fake_server, peft_adapters):
    http = fake_server.client()
    old = upload(http, "evolving", peft_adapters["a"]).json()
    old_blob = fake_server.store.root / "blobs" / old["sha256"]
    fake_server.engine.gate.clear()
    body = {"model": "evolving", "messages": USER, "max_tokens": 4, "ignore_eos": True, "stream": True}
    stream = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert stream.status_code == 200 and wait_until(lambda: len(fake_server.engine.running) == 1)

    new = upload(http, "evolving", peft_adapters["b"]).json()
    assert new["version"] == 2
    assert http.delete("/v1/adapters/evolving").status_code == 200
    assert http.get("/v1/adapters/evolving").status_code == 404
    assert old_blob.is_dir()  # the queued request on version 1 still needs it
    assert old["id"] not in fake_server.engine.forgotten

    fake_server.engine.gate.set()
    text = "".join(stream.iter_text())
    stream.close()
    assert '"finish_reason": "length"' in text and text.rstrip().endswith("data: [DONE]")
    assert wait_until(lambda: not old_blob.exists())
    assert wait_until(lambda: set(fake_server.engine.forgotten) == {old["id"], new["id"]})
    assert fake_server.client("bob").get("/v1/models").status_code == 200


def test_a_merge_holds_its_sources_while_it_reads_them(fake_server, peft_adapters, monkeypatch):
    http = fake_server.client()
    source = upload(http, "source", peft_adapters["a"]).json()
    upload(http, "other", peft_adapters["b"])
    blob = fake_server.store.root / "blobs" / source["sha256"]
    original, entered, release = merge_api._merge_into, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        entered.set()
        assert release.wait(GUARD_S)
        return original(*args, **kwargs)

    monkeypatch.setattr(merge_api, "_merge_into", held)
    result = {}
    body = {
        "name": "merged",
        "method": "linear",
        "adapters": [{"name": "source", "weight": 0.5}, {"name": "other", "weight": 0.5}],
    }
    worker = threading.Thread(
        target=lambda: result.update(r=fake_server.client().post("/v1/adapters/merge", json=body))
    )
    worker.start()
    try:
        assert entered.wait(GUARD_S)
        assert http.delete("/v1/adapters/source").status_code == 200
        assert blob.is_dir()  # held by the merge
    finally:
        release.set()
        worker.join(GUARD_S)
    assert result["r"].status_code == 201, result["r"].text
    assert wait_until(lambda: not blob.exists())


class _RecordingStore(AdapterStore):
    """The store (whose `delete` only tombstones), recording each `collect_garbage(in_use)` the
    server asks for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.collections: list[set[str]] = []

    def collect_garbage(self, in_use: set[str] | frozenset[str] = frozenset()) -> list[str]:
        self.collections.append(set(in_use))
        return super().collect_garbage(in_use)


def test_with_a_tombstoning_store_delete_answers_at_once_and_collection_skips_blobs_in_use(
    tiny_tokenizer, tiny_base_info, tmp_path, peft_adapters
):
    engine = FakeEngine(tiny_tokenizer)
    store = _RecordingStore(tmp_path / "store")
    app = create_app(
        ServerConfig(max_model_len=256, api_keys=tuple(KEYS.items()), admin_key=ADMIN_KEY),
        engine,
        store,
        base_info=tiny_base_info,
    )
    with LiveServer(app) as live:
        server = FakeServer(live, engine, store, app.state.loraswap)
        try:
            http = server.client()
            card = upload(http, "doomed", peft_adapters["a"]).json()
            blob = store.root / "blobs" / card["sha256"]
            engine.gate.clear()
            body = {"model": "doomed", "messages": USER, "max_tokens": 3, "ignore_eos": True, "stream": True}
            stream = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
            assert wait_until(lambda: len(engine.running) == 1)
            assert http.delete("/v1/adapters/doomed").status_code == 200
            pointer = store._read_pointer("alice", "doomed")  # read back from disk
            assert pointer is not None and not pointer.live  # the tombstone is durable before the answer
            assert wait_until(lambda: store.collections and card["sha256"] in store.collections[-1])
            assert blob.is_dir() and card["id"] not in engine.forgotten
            engine.gate.set()
            assert "data: [DONE]" in "".join(stream.iter_text())
            stream.close()
            assert wait_until(lambda: not blob.exists())  # collected again once its request left
            assert wait_until(lambda: engine.forgotten == [card["id"]])
        finally:
            server.close()

"""The ingress's event loop never waits on the store actor (no Ray cluster needed).

`RemoteStore` over a stand-in actor whose calls return awaitable refs and block, on request, until
the test lets them go: while a chat request's name lookup is held inside the "actor", `/health`,
`/v1/models` for the base and another tenant's chat all answer. Ordering and events only (no
timing): if the lookup blocked the loop, those calls could not answer before it was released.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from adapters.store import AdapterStore
from server.cluster.store import RemoteStore, StoreService
from server.settings import ServerConfig
from tests.server.conftest import KEYS, write_peft_adapter
from tests.server.fake_engine import FakeEngine
from tests.server.live import LiveServer

QUESTION = [{"role": "user", "content": "Hello there"}]


class Ref:
    """An ObjectRef stand-in: awaitable; `ray.get` is patched to resolve it in a thread."""

    def __init__(self, actor: GatedActor, method: str, args: tuple):
        self.actor, self.method, self.args = actor, method, args

    def result(self):
        if self.method in self.actor.gated:
            self.actor.entered.set()
            self.actor.release.wait()
        return getattr(self.actor.service, self.method)(*self.args)

    def __await__(self):
        import asyncio

        return asyncio.to_thread(self.result).__await__()


class GatedActor:
    """`StoreService` behind `.method.remote(...)`; calls to `gated` methods wait for `release`."""

    def __init__(self, service: StoreService):
        self.service = service
        self.gated: set[str] = set()
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, method: str):
        return SimpleNamespace(remote=lambda *args: Ref(self, method, args))


@pytest.fixture
def gated_server(tiny_base_dir, tmp_path, monkeypatch):
    import ray
    from transformers import AutoTokenizer

    from adapters.base import BaseInfo
    from server.app import create_app

    monkeypatch.setattr(ray, "get", lambda ref: ref.result())  # the blocking path, used from threads
    service = StoreService.__new__(StoreService)
    service.store = AdapterStore(tmp_path / "store")
    service.store.publish("alice", "persona", write_peft_adapter(tiny_base_dir, tmp_path / "a", seed=1))
    actor = GatedActor(service)
    store = RemoteStore(actor, tmp_path / "ingress-cache")
    config = ServerConfig(max_model_len=256, api_keys=tuple(KEYS.items()))
    engine = FakeEngine(AutoTokenizer.from_pretrained(tiny_base_dir))
    app = create_app(config, engine, store, base_info=BaseInfo.from_dir(tiny_base_dir))
    with LiveServer(app) as live:
        yield live, actor
    actor.release.set()


def _client(url: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=60)


def test_a_pending_store_lookup_does_not_stall_the_loop(gated_server):
    live, actor = gated_server
    actor.gated = {"get"}
    with _client(live.url, "alice") as alice, _client(live.url, "bob") as bob, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(alice.post, "/v1/chat/completions", json={"model": "persona", "messages": QUESTION})
        assert actor.entered.wait(60)  # the lookup is inside the store actor now, held there
        assert alice.get("/health").status_code == 200
        base = bob.get("/v1/models").json()["data"][0]["id"]
        reply = bob.post("/v1/chat/completions", json={"model": base, "messages": QUESTION, "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert not pending.done()  # still waiting on the store, while everything else answered
        actor.release.set()
        response = pending.result(timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def test_remote_lookups_answer_like_the_local_store(gated_server):
    live, _ = gated_server
    with _client(live.url, "alice") as alice, _client(live.url, "bob") as bob:
        assert [a["name"] for a in alice.get("/v1/adapters").json()["data"]] == ["persona"]
        assert alice.get("/v1/adapters/persona").json()["name"] == "persona"
        assert "persona" in [m["id"] for m in alice.get("/v1/models").json()["data"]]
        missing = bob.post("/v1/chat/completions", json={"model": "persona", "messages": QUESTION})
        assert missing.status_code == 404
        assert missing.json()["error"]["param"] == "model"
        assert alice.delete("/v1/adapters/persona").status_code == 200
        gone = alice.post("/v1/chat/completions", json={"model": "persona", "messages": QUESTION})
        assert gone.status_code == 404

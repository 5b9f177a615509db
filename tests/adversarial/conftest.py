"""The adversarial suite's one live server per session, with three tenants and a few real adapters.

`adv` (session-scoped) starts `loraswap serve` on the tiny base in a child process (see
server_process.py for its small limits), uploads alice's and bob's real adapters and carol's
four slot-hogging ones, and computes solo greedy references lazily on the same server. The
server is stopped at the end of the session; `adv.server.restart()` keeps the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.adversarial.clients import References, upload
from tests.adversarial.hostile_adapters import valid_adapter
from tests.adversarial.server_process import ServerProcess


@dataclass
class Adversarial:
    server: ServerProcess
    base_id: str
    base_info: object
    refs: References
    adapters: dict[str, dict[str, bytes]] = field(default_factory=dict)  # "tenant/name" -> files

    @property
    def url(self) -> str:
        return self.server.url


REAL = {  # tenant/name -> seed of a valid adapter
    "alice/alice-a": 1,
    "alice/alice-b": 2,
    "bob/bob-a": 3,
    "bob/bob-b": 4,
    "carol/carol-0": 10,
    "carol/carol-1": 11,
    "carol/carol-2": 12,
    "carol/carol-3": 13,
}


@pytest.fixture(scope="session")
def adv(tiny_base_dir, tmp_path_factory):
    from adapters.base import BaseInfo

    root = tmp_path_factory.mktemp("adversarial")
    server = ServerProcess(tiny_base_dir, root / "store", root / "server.log")
    server.start()
    try:
        base_info = BaseInfo.from_dir(tiny_base_dir)
        import httpx

        from tests.adversarial.clients import headers

        models = httpx.get(f"{server.url}/v1/models", headers=headers("alice"), timeout=30).json()
        base_id = models["data"][0]["id"]
        state = Adversarial(server, base_id, base_info, References(server.url))
        for key, seed in REAL.items():
            tenant, name = key.split("/")
            files = valid_adapter(base_info, seed=seed)
            response = upload(server.url, tenant, name, files)
            assert response.status_code == 201, response.text
            state.adapters[key] = files
        yield state
    finally:
        server.stop()


@pytest.fixture
def alive(adv):
    """After each test: the server still answers /health (a test that kills it fails here)."""
    yield adv
    assert adv.server.alive(), f"the server died:\n{adv.server.log_tail()}"

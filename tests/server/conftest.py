"""Fixtures for the HTTP tests: the tiny base's tokenizer and info, PEFT-written adapters, and a
live server (real uvicorn) over the fake engine with a fresh store and two tenants."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from server.settings import ServerConfig
from tests.server.fake_engine import FakeEngine
from tests.server.live import LiveServer

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-9876543210"}
ADMIN_KEY = "sk-admin-5555555555"


def write_peft_adapter(
    base_dir: Path, out_dir: Path, seed: int = 0, rank: int = 4, targets=("q_proj", "v_proj"), scale: float = 1.0
) -> Path:
    """Let PEFT itself write a LoRA adapter for `base_dir` with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def upload(
    client: httpx.Client,
    name: str,
    directory: Path | None = None,
    *,
    files=None,
    allow_template_mismatch: bool | None = None,
) -> httpx.Response:
    """POST /v1/adapters with `directory`'s files (or explicit `files` tuples) as multipart."""
    if files is None:
        files = [
            ("files", (p.name, p.read_bytes(), "application/octet-stream"))
            for p in sorted(Path(directory).iterdir())
            if p.is_file()
        ]
    data = {"name": name}
    if allow_template_mismatch is not None:
        data["allow_template_mismatch"] = "true" if allow_template_mismatch else "false"
    return client.post("/v1/adapters", data=data, files=files)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base_dir)


@pytest.fixture(scope="session")
def tiny_base_info(tiny_base_dir):
    from adapters.base import BaseInfo

    return BaseInfo.from_dir(tiny_base_dir)


@pytest.fixture(scope="session")
def peft_adapters(tiny_base_dir, tmp_path_factory):
    """Two different PEFT-written adapters for the tiny base."""
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        "a": write_peft_adapter(tiny_base_dir, root / "a", seed=1),
        "b": write_peft_adapter(tiny_base_dir, root / "b", seed=2, rank=8, targets=("o_proj", "down_proj")),
    }


class FakeServer:
    """A live app over the fake engine; `client(tenant)` is an httpx client with that tenant's key."""

    def __init__(self, live: LiveServer, engine: FakeEngine, store, state):
        self.live, self.engine, self.store, self.state = live, engine, store, state
        self.url = live.url
        self._clients: list[httpx.Client] = []

    def client(self, tenant: str | None = "alice", **kwargs) -> httpx.Client:
        """`tenant` "admin" gets the admin key (for /metrics); None sends no key."""
        key = ADMIN_KEY if tenant == "admin" else KEYS.get(tenant)
        headers = {"Authorization": f"Bearer {key}"} if tenant else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)
        self._clients.append(client)
        return client

    def openai(self, tenant: str = "alice"):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEYS[tenant], max_retries=0, timeout=30)

    def close(self):
        for client in self._clients:
            client.close()


@pytest.fixture
def make_fake_server(tiny_tokenizer, tiny_base_info, tmp_path):
    """Factory: `make_fake_server(engine=, base_info=, **config_overrides)` -> a started FakeServer
    (stopped at teardown); `base_info` (its chat template) defaults to the tiny base's."""
    from adapters.store import AdapterStore
    from server.app import create_app

    started = []

    def make(engine: FakeEngine | None = None, base_info=None, **overrides) -> FakeServer:
        settings = dict(max_model_len=256, api_keys=tuple(KEYS.items()), admin_key=ADMIN_KEY)
        settings.update(overrides)
        engine = engine or FakeEngine(tiny_tokenizer)
        store = AdapterStore(tmp_path / f"store-{len(started)}")
        app = create_app(ServerConfig(**settings), engine, store, base_info=base_info or tiny_base_info)
        live = LiveServer(app).__enter__()
        server = FakeServer(live, engine, store, app.state.loraswap)
        started.append(server)
        return server

    yield make
    for server in started:
        server.close()
        server.live.__exit__(None, None, None)


@pytest.fixture
def fake_server(make_fake_server) -> FakeServer:
    return make_fake_server()


@pytest.fixture(scope="session")
def real_server(tiny_base_dir, tmp_path_factory):
    """One live server over the real engine on the tiny base, shared by the whole session (building
    an engine costs seconds). Tests upload adapters under names of their own and compare counters
    with their values at the test's start, so sharing cannot couple them."""
    from tests.server.real import real_live_server

    with real_live_server(tiny_base_dir, tmp_path_factory.mktemp("real-store")) as live:
        yield live


@pytest.fixture(scope="session")
def tools_base_dir(tiny_base_dir, tmp_path_factory):
    """The tiny base with a Hermes / Qwen2.5-style tool template (same weights and tokenizer)."""
    from tests.tiny import HERMES_TOOLS_TEMPLATE, with_chat_template

    return with_chat_template(tiny_base_dir, tmp_path_factory.mktemp("tools-base") / "base", HERMES_TOOLS_TEMPLATE)

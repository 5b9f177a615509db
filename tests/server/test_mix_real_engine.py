"""Adapter mixes over the HTTP API and the real engine (tiny base, fp32), through the `openai` client:
a 2- and a 3-adapter mix answer with exactly the greedy tokens of the saved `cat` merge with the
same weights (adapters/merge.py, uploaded as an ordinary adapter), plain, streamed and on
`/v1/completions`."""

from __future__ import annotations

import httpx
import pytest

from adapters.format import read_peft, write_peft
from adapters.merge import MergeInput, merge_adapters
from tests.server.conftest import upload, write_peft_adapter
from tests.server.real import real_live_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 10
WEIGHTS = {"m1": 0.7, "m2": -0.4, "m3": 1.3}


@pytest.fixture(scope="module")
def mix_server(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-peft")
    sources = {
        "m1": write_peft_adapter(tiny_base_dir, root / "m1", seed=31, rank=4, scale=2.0),
        "m2": write_peft_adapter(tiny_base_dir, root / "m2", seed=32, rank=8, targets=("o_proj", "down_proj")),
        "m3": write_peft_adapter(tiny_base_dir, root / "m3", seed=33, rank=4, targets=("q_proj", "gate_proj")),
    }
    store = tmp_path_factory.mktemp("mix-store")
    with real_live_server(tiny_base_dir, store, max_loras=3, max_cpu_loras=8, num_kv_blocks=256) as live:
        http = httpx.Client(base_url=live.url, timeout=60)
        for name, directory in sources.items():
            assert upload(http, name, directory).status_code == 201
        live.sources, live.http = sources, http
        yield live
        http.close()


def _client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _chat_ids(server, model: str, mix: list[dict] | None = None) -> tuple[list[int], str]:
    extra = {"return_tokens_as_token_ids": True, **({"adapters": mix} if mix else {})}
    response = _client(server).chat.completions.create(
        model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, extra_body=extra
    )
    choice = response.choices[0]
    return [int(entry.token.removeprefix("token_id:")) for entry in choice.logprobs.content], choice.message.content


def _upload_cat(server, names: list[str], tmp_path) -> str:
    """The `cat` merge of `names` with WEIGHTS, saved and uploaded as an ordinary adapter."""
    inputs = [MergeInput(weights=read_peft(server.sources[n]), weight=WEIGHTS[n], name=n) for n in names]
    merged = tmp_path / "cat"
    write_peft(merge_adapters(inputs, "cat").weights, merged)
    name = "cat-" + "-".join(names)
    assert upload(server.http, name, merged).status_code == 201
    return name


@pytest.mark.parametrize("names", [["m1", "m2"], ["m1", "m2", "m3"]])
def test_mix_greedy_tokens_equal_the_uploaded_cat_merge(mix_server, tmp_path, names):
    base = mix_server.state.base_id
    cat = _upload_cat(mix_server, names, tmp_path)
    mix = [{"name": n, "weight": WEIGHTS[n]} for n in names]
    expected = _chat_ids(mix_server, cat)
    assert _chat_ids(mix_server, base, mix) == expected
    assert expected != _chat_ids(mix_server, base), "the mix does not change the answer; the test proves nothing"
    assert expected != _chat_ids(mix_server, names[0])

    streamed = list(
        _client(mix_server).chat.completions.create(
            model=base,
            messages=QUESTION,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"adapters": mix},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected[1]

    legacy = _client(mix_server).completions.create(
        model=base,
        prompt="The capital of France is",
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"adapters": mix},
    )
    reference = _client(mix_server).completions.create(
        model=cat, prompt="The capital of France is", max_tokens=MAX_TOKENS, temperature=0
    )
    assert legacy.choices[0].text == reference.choices[0].text
    engine = mix_server.engine
    assert engine.stats().running == 0 and all(p == 0 for p in engine.slots.pins)

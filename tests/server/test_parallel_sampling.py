"""`n > 1` and the prefix cache through the `openai` client, over the real engine on the tiny base.

Choice `i` of a seeded `n` request must equal a single request seeded `seed + i` (the reference:
sharing the prompt's blocks must not change what any choice samples); streaming interleaves
chunks by `index` and gives the same texts; usage counts the prompt once; a repeated prompt
reports `cached_tokens`; bounds on `n` and `cache_salt` are 400s naming the field.
"""

from __future__ import annotations

import httpx
import pytest

from server.limits import Limits
from server.settings import ServerConfig
from tests.server.live import wait_until
from tests.server.real import real_live_server

QUESTION = [
    {"role": "system", "content": "You are a helpful assistant who answers briefly and precisely."},
    {"role": "user", "content": "Name three rivers of Europe."},
]


@pytest.fixture(scope="module")
def server(tiny_base_dir, tmp_path_factory):
    config = ServerConfig(max_model_len=512, limits=Limits(max_n=4))
    with real_live_server(tiny_base_dir, tmp_path_factory.mktemp("parallel-store"), config, num_kv_blocks=256) as live:
        yield live


def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def chat(server, **kw):
    args = dict(model=server.state.base_id, messages=QUESTION, max_tokens=10, temperature=1.0, seed=1234)
    return client(server).chat.completions.create(**(args | kw))


def released(server) -> bool:
    stats = server.engine.stats()
    return stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


def test_seeded_choices_equal_single_requests_seeded_seed_plus_index(server):
    reply = chat(server, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert texts == [chat(server, seed=1234 + i).choices[0].message.content for i in range(3)]
    assert len(set(texts)) > 1  # distinct samples, not one sample three times
    assert [c.message.content for c in chat(server, n=3).choices] == texts  # reproducible
    single = chat(server)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    assert reply.usage.completion_tokens == sum(chat(server, seed=1234 + i).usage.completion_tokens for i in range(3))
    assert wait_until(lambda: released(server))
    server.engine.blocks.check()


def test_streamed_choices_interleave_by_index_with_the_same_texts(server):
    want = [c.message.content for c in chat(server, n=2, seed=77).choices]
    chunks = list(chat(server, n=2, seed=77, stream=True, stream_options={"include_usage": True}))
    texts, finishes = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == want and None not in finishes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert wait_until(lambda: released(server))


def test_repeated_prompt_reports_cached_tokens_and_same_greedy_answer(server):
    first = chat(server, temperature=0, extra_body={"cache_salt": "greedy-test"})
    second = chat(server, temperature=0, extra_body={"cache_salt": "greedy-test"})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 8 == 0  # whole blocks of 8
    assert second.choices[0].message.content == first.choices[0].message.content
    assert server.engine.stats().prefix_cache_hits > 0


@pytest.mark.parametrize(
    ("body", "param"),
    [({"n": 5}, "n"), ({"n": 0}, "n"), ({"cache_salt": "x" * 257}, "cache_salt"), ({"cache_salt": ""}, "cache_salt")],
)
def test_out_of_bounds_n_and_cache_salt_are_400s_naming_the_field(server, body, param):
    request = {"model": server.state.base_id, "messages": QUESTION, "max_tokens": 2} | body
    response = httpx.post(f"{server.url}/v1/chat/completions", json=request, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param

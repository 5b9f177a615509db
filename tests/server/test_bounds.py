"""Request field bounds at the edge (the issue-9 contract) and rendering off the event loop.

Every out-of-range field is a 400 `invalid_request` naming the field, decided before any
rendering and before the engine sees anything; the structural limits (message count, total
characters) are checked before the chat template runs; and a render that takes long (a huge but
allowed prompt) runs in the render pool, so `/health` and other tenants are answered meanwhile.
"""

from __future__ import annotations

import threading

import pytest

from server.limits import Limits

USER = [{"role": "user", "content": "hi"}]
GUARD_S = 30  # a hang guard only, never a measurement


def _chat(server, tenant="alice", **fields):
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 2, **fields}
    return server.client(tenant).post("/v1/chat/completions", json=body)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1e-300}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 2**63}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop": ["ok", "y" * 257]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"max_tokens": 257}, "max_tokens"),
        ({"max_tokens": None, "max_completion_tokens": 10**9}, "max_completion_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"n": 9}, "n"),  # above --limits.max_n (8)
    ],
)
def test_out_of_range_fields_are_400_naming_the_field(fake_server, fields, param):
    response = _chat(fake_server, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_request", error
    assert not fake_server.engine.prompts  # refused before the engine
    assert _chat(fake_server, tenant="bob").status_code == 200


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0.0},
        {"temperature": 2.0},
        {"top_k": 2**31 - 1},
        {"top_k": -1},
        {"seed": 2**63 - 1},
        {"seed": -(2**63)},
        {"stop": ["s"] * 16},
        {"stop": "x" * 256},
        {"top_logprobs": 20, "logprobs": True},
        {"min_tokens": 2, "max_tokens": 2},
    ],
)
def test_fields_at_their_bounds_are_served(fake_server, fields):
    assert _chat(fake_server, **fields).status_code == 200


def test_a_tiny_temperature_is_greedy_not_a_division(fake_server):
    assert _chat(fake_server, temperature=1e-300).status_code == 200
    (request_id,) = fake_server.engine.prompts
    assert fake_server.engine.running == {} and request_id in fake_server.engine.finished
    # the engine saw greedy decoding, not 1/1e-300
    sampling = _last_sampling(fake_server)
    assert sampling.temperature == 0.0 and sampling.greedy


def _last_sampling(server):
    seen = []
    original = server.engine.add_request

    def spy(*args, **kwargs):
        seen.append(args[3])
        return original(*args, **kwargs)

    server.engine.add_request = spy
    try:
        assert _chat(server, temperature=1e-6).status_code == 200
    finally:
        server.engine.add_request = original
    return seen[0]


class _RenderProbe:
    """Wraps the template's render: counts calls, and can hold one render until released."""

    def __init__(self, template, hold: bool = False):
        self.template, self.original = template, template.render
        self.calls = 0
        self.entered, self.release = threading.Event(), threading.Event()
        if not hold:
            self.release.set()
        template.render = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.entered.set()
        assert self.release.wait(GUARD_S)
        return self.original(*args, **kwargs)

    def restore(self):
        self.release.set()
        self.template.render = self.original


def test_message_count_and_characters_are_refused_before_rendering(make_fake_server):
    server = make_fake_server(limits=Limits(max_messages=8, max_prompt_chars=1000))
    probe = _RenderProbe(server.state.template)
    try:
        many = [{"role": "user", "content": "x"}] * 9
        response = _chat(server, messages=many)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
        long = [{"role": "user", "content": [{"type": "text", "text": "y" * 1001}]}]  # nested parts count too
        response = _chat(server, messages=long)
        assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
        tokenize = server.client().post("/tokenize", json={"model": server.state.base_id, "messages": many})
        assert tokenize.status_code == 400 and tokenize.json()["error"]["param"] == "messages"
        assert probe.calls == 0
        assert _chat(server, tenant="bob", messages=[{"role": "user", "content": "hello " * 30}]).status_code == 200
        assert probe.calls == 1
    finally:
        probe.restore()


def test_an_8_mib_message_is_413_before_it_is_parsed(fake_server):
    response = _chat(fake_server, messages=[{"role": "user", "content": "x" * (8 << 20)}])
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert _chat(fake_server, tenant="bob").status_code == 200


def test_health_and_other_tenants_are_answered_while_a_render_runs(fake_server):
    """The render is held inside the render pool; if it ran on the event loop, nothing below
    could be answered until it was released (the test would hang until its guard)."""
    probe = _RenderProbe(fake_server.state.template, hold=True)
    result = {}
    big = [{"role": "user", "content": "word " * 20000}]  # allowed, and slow to render and tokenize
    worker = threading.Thread(target=lambda: result.update(response=_chat(fake_server, messages=big, max_tokens=None)))
    worker.start()
    try:
        assert probe.entered.wait(GUARD_S)
        assert fake_server.client(tenant=None).get("/health").json() == {"status": "ok"}
        assert fake_server.client("bob").get("/v1/models").status_code == 200
        assert "response" not in result  # still held: the answers above came while it rendered
    finally:
        probe.restore()
        worker.join(GUARD_S)
    # the long prompt exceeds the test model length (256 tokens): its own 400, after rendering
    assert result["response"].status_code == 400
    assert result["response"].json()["error"]["code"] == "context_length_exceeded"

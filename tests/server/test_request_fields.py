"""Every field of OpenAI's chat-completions request is honoured or refused by name, never ignored.

The list of fields comes from the pinned `openai` package's own `CompletionCreateParams` types, so
a field OpenAI adds fails `test_the_policy_table_covers_every_openai_field` until it is classified.
Honoured fields must be accepted and (where they are decoding settings) reach the engine; refused
fields set to a real value must answer 400 with `param` naming them.
"""

from __future__ import annotations

import typing

import pytest

from server.api.request_fields import CHAT_FIELDS, HINT, HONOURED, REFUSED
from tests.server.fake_engine import FakeEngine

USER = [{"role": "user", "content": "Say hello."}]


def openai_chat_fields() -> set[str]:
    from openai.types.chat import completion_create_params as params

    return set(typing.get_type_hints(params.CompletionCreateParamsStreaming)) | set(
        typing.get_type_hints(params.CompletionCreateParamsNonStreaming)
    )


# A real ("on") value for each field, as a client would send it.
ON_VALUES = {
    "messages": USER,
    "model": None,
    "max_tokens": 4,
    "max_completion_tokens": 4,
    "temperature": 0.5,
    "top_p": 0.9,
    "n": 1,
    "stop": ["zzz"],
    "seed": 3,
    "stream": False,
    "stream_options": {"include_usage": True},
    "logprobs": True,
    "top_logprobs": 2,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "logit_bias": {"5": 2.5},
    "response_format": {"type": "json_object"},
    "user": "end-user-1",
    "safety_identifier": "u1",
    "metadata": {"k": "v"},
    "prompt_cache_key": "conv-1",
    "prompt_cache_retention": "24h",
    "parallel_tool_calls": True,
    "service_tier": "flex",
    "store": True,
    "audio": {"voice": "alloy", "format": "mp3"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "high",
    "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
    "prompt_cache_options": {"mode": "explicit"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
# Fields that only mean something beside another one (the tiny base's template has no tool support,
# so tools need a tool_choice that constrains the call).
CONTEXT = {
    "tools": {"tool_choice": "required"},
    "tool_choice": {"tools": TOOLS, "tool_choice": "required"},
    "parallel_tool_calls": {"tools": TOOLS, "tool_choice": "required"},
}
# How honoured decoding settings show up in the engine's SamplingParams.
REACHES_ENGINE = {
    "max_tokens": ("max_tokens", 4),
    "max_completion_tokens": ("max_tokens", 4),
    "temperature": ("temperature", 0.5),
    "top_p": ("top_p", 0.9),
    "stop": ("stop", ("zzz",)),
    "seed": ("seed", 3),
    "top_logprobs": ("logprobs", 2),
    "presence_penalty": ("presence_penalty", 0.5),
    "frequency_penalty": ("frequency_penalty", -0.5),
    "logit_bias": ("logit_bias", ((5, 2.5),)),
}


class RecordingEngine(FakeEngine):
    """The fake engine, remembering each request's SamplingParams."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.sampling: dict[str, object] = {}

    def add_request(self, request_id, prompt_ids, adapter, sampling, tenant="default"):
        self.sampling[request_id] = sampling
        return super().add_request(request_id, prompt_ids, adapter, sampling, tenant)


@pytest.fixture
def server(make_fake_server, tiny_tokenizer):
    return make_fake_server(engine=RecordingEngine(tiny_tokenizer))


def test_the_policy_table_covers_every_openai_field():
    fields = openai_chat_fields()
    assert len(fields) > 30  # the real list, not an empty import
    assert fields - set(CHAT_FIELDS) == set(), "classify these new OpenAI fields in request_fields.py"
    assert set(ON_VALUES) >= fields
    assert {policy.kind for policy in CHAT_FIELDS.values()} == {HONOURED, HINT, REFUSED}


@pytest.mark.parametrize("name", sorted(openai_chat_fields()))
def test_each_openai_field_is_honoured_or_refused_by_name(server, name):
    http = server.client()
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 4}
    if name not in ("model",):
        body[name] = ON_VALUES[name]
    if name == "top_logprobs":
        body["logprobs"] = True
    body.update(CONTEXT.get(name, {}))
    response = http.post("/v1/chat/completions", json=body)
    policy = CHAT_FIELDS[name]
    if policy.kind == REFUSED:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == name and name in error["message"]
        assert error["type"] == "invalid_request_error"
        return
    assert response.status_code == 200, response.text
    if name in REACHES_ENGINE:
        attribute, expected = REACHES_ENGINE[name]
        sampling = server.engine.sampling[response.json()["id"]]
        assert getattr(sampling, attribute) == expected


@pytest.mark.parametrize(
    "name, off",
    [
        ("store", False),
        ("modalities", ["text"]),
        ("service_tier", "auto"),
        ("functions", []),
        ("function_call", "none"),
        ("audio", None),
    ],
)
def test_refused_fields_pass_when_set_to_their_off_value(server, name, off):
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 4, name: off}
    assert server.client().post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize(
    "field, value",
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.1),
        ("repetition_penalty", 0),
        ("min_p", 1.5),
        ("logit_bias", {"999999": 1}),
        ("logit_bias", {"5": 101}),
        ("logit_bias", {"abc": 1}),
    ],
)
def test_out_of_range_sampling_controls_are_400_naming_the_field(server, field, value):
    body = {"model": server.state.base_id, "messages": USER, field: value}
    response = server.client().post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert field in (response.json()["error"]["param"] or "")


def test_developer_role_is_rendered_as_system(server, tiny_tokenizer):
    http = server.client()
    base = server.state.base_id
    as_developer = http.post(
        "/v1/chat/completions",
        json={"model": base, "max_tokens": 2, "messages": [{"role": "developer", "content": "Be brief."}, *USER]},
    )
    as_system = http.post(
        "/v1/chat/completions",
        json={"model": base, "max_tokens": 2, "messages": [{"role": "system", "content": "Be brief."}, *USER]},
    )
    assert as_developer.status_code == as_system.status_code == 200, as_developer.text
    prompts = server.engine.prompts
    assert prompts[as_developer.json()["id"]] == prompts[as_system.json()["id"]]
    assert "system\nBe brief." in tiny_tokenizer.decode(prompts[as_developer.json()["id"]])


def test_usage_details_are_reported_in_openai_shape(server):
    client = server.openai()
    base = server.state.base_id
    plain = client.chat.completions.create(model=base, messages=USER, max_tokens=4).usage
    streamed = [
        c.usage
        for c in client.chat.completions.create(
            model=base, messages=USER, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
        if c.usage
    ]
    legacy = client.completions.create(model=base, prompt="Hi", max_tokens=4).usage
    for usage in (plain, streamed[-1], legacy):
        assert usage.prompt_tokens_details.cached_tokens == 0  # the fake engine caches nothing
        assert usage.completion_tokens_details.reasoning_tokens == 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0

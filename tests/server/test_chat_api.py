"""Chat completions, models and tokenize through the official `openai` client and raw HTTP.

The fake engine emits a fixed reply token by token, so these tests check the HTTP layer: OpenAI
shapes, streaming, usage, finish reasons, validation and the error envelope.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.fake_engine import REPLY

USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_create_returns_the_engine_reply_with_usage(fake_server):
    client = fake_server.openai()
    base = fake_server.state.base_id
    response = client.chat.completions.create(model=base, messages=USER, max_tokens=64, temperature=0)
    assert response.object == "chat.completion"
    assert response.model == base
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY
    assert choice.finish_reason == "stop"
    prompt = fake_server.engine.prompts[response.id]
    reply_tokens = len(fake_server.engine.reply_ids) + 1  # + the end-of-turn token
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == reply_tokens
    assert response.usage.total_tokens == len(prompt) + reply_tokens


def test_max_tokens_cuts_with_finish_reason_length(fake_server):
    client = fake_server.openai()
    response = client.chat.completions.create(model=fake_server.state.base_id, messages=USER, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3
    expected = fake_server.engine.tokenizer.decode(fake_server.engine.reply_ids[:3])
    assert response.choices[0].message.content == expected
    # max_completion_tokens is the newer name for the same limit
    response = client.chat.completions.create(model=fake_server.state.base_id, messages=USER, max_completion_tokens=2)
    assert response.usage.completion_tokens == 2


def test_stream_chunks_concatenate_to_the_reply_with_usage_last(fake_server):
    client = fake_server.openai()
    base = fake_server.state.base_id
    chunks = list(
        client.chat.completions.create(
            model=base, messages=USER, max_tokens=64, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(fake_server.engine.reply_ids) + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(fake_server):
    http = fake_server.client()
    body = {"model": fake_server.state.base_id, "messages": USER, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[0]  # only with stream_options.include_usage


def test_logprobs_are_returned_in_openai_shape(fake_server):
    client = fake_server.openai()
    response = client.chat.completions.create(
        model=fake_server.state.base_id, messages=USER, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 3
    tokenizer = fake_server.engine.tokenizer
    for entry, token_id in zip(content, fake_server.engine.reply_ids):
        assert entry.token == tokenizer.decode([token_id])
        assert entry.logprob == -0.5 and len(entry.top_logprobs) == 2


def test_sampling_fields_reach_the_engine(fake_server):
    http = fake_server.client()
    body = {
        "model": fake_server.state.base_id,
        "messages": USER,
        "max_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 7,
        "stop": ["xyz"],
        "min_tokens": 2,
        "ignore_eos": True,
    }
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 5


def test_models_list_shows_the_base(fake_server):
    models = fake_server.openai().models.list()
    ids = [m.id for m in models.data]
    assert ids == [fake_server.state.base_id]
    assert models.data[0].owned_by == "loraswap"


def test_unknown_model_is_404_model_not_found(fake_server):
    client = fake_server.openai()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-adapter", messages=USER)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert not fake_server.engine.prompts  # never a silent answer from the base


def test_openai_client_raises_typed_errors(fake_server):
    base = fake_server.state.base_id
    with pytest.raises(openai.BadRequestError) as info:
        fake_server.openai().chat.completions.create(
            model=base, messages=USER, max_tokens=256
        )  # fits alone, not with the prompt
    assert info.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        fake_server.openai().chat.completions.create(model=base, messages=[{"role": "assistant", "content": "x"}])
    assert info.value.body["code"] == "invalid_messages"
    stranger = openai.OpenAI(base_url=f"{fake_server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": USER}, "model"),
        ({"model": "BASE"}, "messages"),
        ({"model": "BASE", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "BASE", "messages": USER, "temperature": -1}, "temperature"),
        ({"model": "BASE", "messages": USER, "top_p": 0}, "top_p"),
        ({"model": "BASE", "messages": USER, "n": 0}, "n"),
        ({"model": "BASE", "messages": USER, "chat_template": "{{ messages }}"}, "chat_template"),
        ({"model": "BASE", "messages": USER, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
        ({"model": "BASE", "messages": USER, "stop": [""]}, "stop"),
    ],
)
def test_invalid_requests_are_400_in_the_openai_envelope(fake_server, body, param):
    body = {k: fake_server.state.base_id if v == "BASE" else v for k, v in body.items()}
    response = fake_server.client().post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert not fake_server.engine.prompts


def test_malformed_json_is_400(fake_server):
    response = fake_server.client().post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "error" in response.json()


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([], "non-empty"),
        ([{"role": "tool", "content": "x"}], "role"),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "late"},
                {"role": "user", "content": "x"},
            ],
            "system",
        ),
        ([{"role": "user", "content": "   "}], "empty"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text"),
    ],
)
def test_template_rules_are_400_naming_the_problem(fake_server, messages, fragment):
    for path in ("/v1/chat/completions", "/tokenize"):
        response = fake_server.client().post(path, json={"model": fake_server.state.base_id, "messages": messages})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert fragment in error["message"] and error["code"] == "invalid_messages"


def test_prompt_too_long_states_both_counts(make_fake_server):
    server = make_fake_server(max_model_len=64)
    http = server.client()
    count = http.post("/tokenize", json={"model": server.state.base_id, "messages": USER}).json()["count"]
    response = http.post(
        "/v1/chat/completions", json={"model": server.state.base_id, "messages": USER, "max_tokens": 64 - count + 1}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert f"{count} tokens" in error["message"] and f"{64 - count + 1} more" in error["message"]
    assert "64" in error["message"]
    ok = http.post(
        "/v1/chat/completions", json={"model": server.state.base_id, "messages": USER, "max_tokens": 64 - count}
    )
    assert ok.status_code == 200


def test_continue_final_message_leaves_the_assistant_turn_open(fake_server):
    http = fake_server.client()
    messages = USER + [{"role": "assistant", "content": "The capital is"}]
    body = {
        "model": fake_server.state.base_id,
        "messages": messages,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    tokens = http.post("/tokenize", json=body).json()["tokens"]
    end_of_turn = fake_server.engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens[-1] != end_of_turn
    assert http.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200


def test_tokenize_matches_the_prompt_the_engine_receives(fake_server):
    http = fake_server.client()
    base = fake_server.state.base_id
    tokenized = http.post("/tokenize", json={"model": base, "messages": USER}).json()
    assert tokenized["max_model_len"] == 256 and tokenized["count"] == len(tokenized["tokens"])
    completion = http.post("/v1/chat/completions", json={"model": base, "messages": USER, "max_tokens": 1}).json()
    assert fake_server.engine.prompts[completion["id"]] == tokenized["tokens"]
    # and the ids are those of the base's own template applied by transformers
    expected = fake_server.engine.tokenizer.apply_chat_template(
        USER, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert tokenized["tokens"] == list(expected)


def test_unknown_routes_use_the_envelope(fake_server):
    response = fake_server.client().get("/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()

"""`tool_choice: "auto"` on a base whose template has tool support (the tiny base with a Hermes /
Qwen2.5-style template), through the official `openai` client.

The fake engine replies with fixed text, so each test decides what "the model" wrote: well-formed
calls become OpenAI `tool_calls` (plain and streamed, content = the text before the first call);
anything else stays content, as OpenAI does. One test runs the real engine over the same base:
with tools rendered into the prompt, `auto` answers exactly what `none` answers when the model
writes no call (the random tiny model never does).
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.fake_engine import FakeEngine
from tests.server.real import openai_client, real_live_server
from tests.server.test_tools import CLOCK, USER, WEATHER

TWO_CALLS = (
    'Checking both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def tools_tokenizer(tools_base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tools_base_dir)


@pytest.fixture
def serve(make_fake_server, tools_base_dir, tools_tokenizer):
    """`serve(reply)` -> an openai client over a fake engine that answers `reply`, on the tool base."""
    from adapters.base import BaseInfo

    def make(reply: str):
        engine = FakeEngine(tools_tokenizer, reply=reply)
        # the tiny tokenizer spends a token per few characters of tool JSON: room for the definitions
        server = make_fake_server(engine=engine, base_info=BaseInfo.from_dir(tools_base_dir), max_model_len=2048)
        return server, server.openai("alice"), server.state.base_id

    return make


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_calls_in_the_output_become_tool_calls(serve):
    server, client, base = serve(TWO_CALLS)
    response = client.chat.completions.create(model=base, messages=USER, tools=[WEATHER, CLOCK], tool_choice="auto")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both.\n"
    assert _calls(choice.message) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": 1})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    assert len({c.id for c in choice.message.tool_calls}) == 2


def test_tools_are_rendered_into_the_prompt(serve, tools_tokenizer):
    server, client, base = serve(TWO_CALLS)
    client.chat.completions.create(model=base, messages=USER, tools=[WEATHER], tool_choice="auto")
    (prompt,) = server.engine.prompts.values()
    text = tools_tokenizer.decode(prompt)
    assert '"name": "get_weather"' in text and "<tools>" in text


def test_tool_choice_defaults_to_auto_when_tools_are_given(serve):
    server, client, base = serve(TWO_CALLS)
    response = client.chat.completions.create(model=base, messages=USER, tools=[WEATHER, CLOCK])
    assert response.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "reply",
    [
        "It is sunny in Paris.",
        '<tool_call>\n{"name": "delete_everything", "arguments": {}}\n</tool_call>',
        "<tool_call>\n{broken\n</tool_call>",
    ],
)
def test_no_or_malformed_calls_are_plain_content(serve, reply):
    server, client, base = serve(reply)
    response = client.chat.completions.create(model=base, messages=USER, tools=[WEATHER, CLOCK], tool_choice="auto")
    choice = response.choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == ("stop", reply, None)


def _stream(client, base, **extra):
    chunks = list(
        client.chat.completions.create(
            model=base, messages=USER, tools=[WEATHER, CLOCK], tool_choice="auto", stream=True, **extra
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, content, calls, finish


def test_streamed_calls_arrive_as_tool_call_deltas(serve):
    server, client, base = serve(TWO_CALLS)
    chunks, content, calls, finish = _stream(client, base, stream_options={"include_usage": True})
    assert content == "Checking both.\n"  # streamed before the opener, never the call text
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": 1}),
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert finish == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("reply", ["Sunny, < 30 degrees <tool", "<tool_call>\n{broken\n</tool_call>"])
def test_streamed_text_without_valid_calls_is_all_content(serve, reply):
    server, client, base = serve(reply)
    _, content, calls, finish = _stream(client, base)
    assert (content, calls, finish) == (reply, {}, ["stop"])


def test_a_template_with_tools_but_an_unknown_call_format_refuses_auto(make_fake_server, tiny_base_dir, tmp_path):
    from transformers import AutoTokenizer

    from adapters.base import BaseInfo
    from tests.tiny import CHATML_TEMPLATE, with_chat_template

    template = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}" + CHATML_TEMPLATE
    base_dir = with_chat_template(tiny_base_dir, tmp_path / "odd", template)
    server = make_fake_server(
        engine=FakeEngine(AutoTokenizer.from_pretrained(base_dir)), base_info=BaseInfo.from_dir(base_dir)
    )
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().chat.completions.create(
            model=server.state.base_id, messages=USER, tools=[WEATHER], tool_choice="auto"
        )
    error = caught.value.body
    assert error["param"] == "tool_choice" and "format" in error["message"] and "hermes" in error["message"]


def test_real_engine_auto_without_a_call_answers_as_none(tools_base_dir, tmp_path):
    with real_live_server(tools_base_dir, tmp_path / "store") as server:
        client = openai_client(server)
        responses = [
            client.chat.completions.create(
                model=server.base, messages=USER, tools=[WEATHER], tool_choice=choice, max_tokens=16, temperature=0
            )
            for choice in ("auto", "none")
        ]
        bare = client.chat.completions.create(model=server.base, messages=USER, max_tokens=1)
    replies = [response.choices[0] for response in responses]
    assert responses[0].usage.prompt_tokens == responses[1].usage.prompt_tokens > bare.usage.prompt_tokens + 50
    assert replies[0].message.tool_calls is None
    assert (replies[0].message.content, replies[0].finish_reason) == (
        replies[1].message.content,
        replies[1].finish_reason,
    )
    assert replies[0].message.content


def test_a_conversation_with_tool_calls_and_results_is_rendered_and_answered(serve, tools_tokenizer):
    server, client, base = serve("It is 18C in Paris.")
    messages = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18C <|im_end|>"},
    ]
    response = client.chat.completions.create(model=base, messages=messages, tools=[WEATHER])
    assert (response.choices[0].message.content, response.choices[0].finish_reason) == ("It is 18C in Paris.", "stop")
    (prompt,) = server.engine.prompts.values()
    text = tools_tokenizer.decode(prompt)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18C <|im_end|>\n</tool_response>" in text
    # the result's "<|im_end|>" is text: the only end-of-turn ids are the template's, one per turn
    end = tools_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompt.count(end) == 4  # system (tools), user, assistant (call), tool result


@pytest.mark.parametrize(
    "message, words",
    [
        ({"role": "assistant", "content": None, "tool_calls": "x"}, "tool_calls must be a list"),
        (
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{"}}]},
            "arguments must be JSON text of an object",
        ),
        ({"role": "tool", "content": "x", "tool_call_id": 5}, "tool_call_id"),
    ],
)
def test_malformed_tool_traffic_is_a_400_naming_the_message(serve, message, words):
    server, client, base = serve("ok")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=base, messages=USER + [message, USER[0]], tools=[WEATHER])
    assert "messages[1]" in caught.value.body["message"] and words in caught.value.body["message"]


def test_deeply_nested_tool_definitions_are_a_400_not_a_crash(serve):
    server, client, base = serve("ok")
    junk: list = []
    for _ in range(200):
        junk = [junk]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "x": junk}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=base, messages=USER, tools=[tool])
    assert caught.value.body["param"] == "tools" and "nested" in caught.value.body["message"]

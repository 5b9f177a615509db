"""Tool calls through the official client on the real engine over the tiny random base.

`required` and a named function constrain decoding to valid calls, so even the noise model's
temperature-1 samples come back as OpenAI `tool_calls` whose `arguments` validate; streaming uses
OpenAI's delta shape. The tiny base's template has no tool support, so `auto`, tool results and
assistant tool calls are 400s that say so; bad tool definitions are 400s naming the tool.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.server.real import openai_client

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def server(real_server):
    real_server.client = openai_client(real_server)
    return real_server


def _valid(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "unit"} and len(args["city"]) <= 10 and args["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "get_time" and set(args) == {"zone"} and -12 <= args["zone"] <= 14


@pytest.mark.parametrize("seed", range(4))
def test_a_named_function_is_always_called_validly(server, seed):
    response = server.client.chat.completions.create(
        model=server.base,
        messages=USER,
        tools=[WEATHER, CLOCK],
        temperature=1.0,
        seed=seed,
        max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    _valid(call.function.name, call.function.arguments)


def test_required_picks_one_of_the_tools(server):
    names = set()
    for seed in range(6):
        response = server.client.chat.completions.create(
            model=server.base,
            messages=USER,
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            temperature=1.0,
            seed=seed,
            max_tokens=120,
            parallel_tool_calls=False,
        )
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message.content
        (call,) = choice.message.tool_calls  # parallel_tool_calls=False: exactly one
        _valid(call.function.name, call.function.arguments)
        names.add(call.function.name)
    assert names <= {"get_weather", "get_time"}


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_streamed_tool_calls_in_openai_delta_shape(server, tool_choice):
    stream = server.client.chat.completions.create(
        model=server.base,
        messages=USER,
        tools=[CLOCK],
        tool_choice=tool_choice,
        temperature=1.0,
        seed=7,
        max_tokens=120,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict] = {}
    finish, usage = None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id:
                    assert call["id"] is None  # the id comes once, in the call's first delta
                    call["id"] = delta.id
                if delta.function and delta.function.name:
                    call["name"] = delta.function.name
                if delta.function and delta.function.arguments:
                    call["arguments"] += delta.function.arguments
    assert finish == "tool_calls" and usage is not None and len(calls) >= 1
    for call in calls.values():
        assert call["id"] and call["name"] == "get_time"
        _valid(call["name"], call["arguments"])


def test_control_tokens_cannot_enter_arguments(server):
    """Even biased hard toward <|im_start|>, a constrained call holds no control token."""
    tokenizer = server.app.state.loraswap.tokenizer
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    response = server.client.chat.completions.create(
        model=server.base,
        messages=USER,
        tools=[WEATHER],
        temperature=1.0,
        seed=1,
        max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias={str(im_start): 100},
    )
    (call,) = response.choices[0].message.tool_calls
    _valid(call.function.name, call.function.arguments)
    assert "<|" not in call.function.arguments


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"tools": [WEATHER]}, "tool_choice", ["auto", "template"]),
        ({"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", ["auto", "template"]),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"},
            "tools[0].function.name",
            ["name"],
        ),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools[1].function.name", ["twice"]),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}], "tool_choice": "required"},
            "tools[0].function.parameters",
            ["schema"],
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
                "tool_choice": "required",
            },
            "tools",
            ["Unimplemented", "not"],
        ),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]", ["function"]),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            ["nope"],
        ),
        ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            ["response_format"],
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_problem(server, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.chat.completions.create(model=server.base, messages=USER, max_tokens=4, **extra)
    assert caught.value.body["param"] == param, caught.value.body
    for word in words:
        assert word in caught.value.body["message"]


@pytest.mark.parametrize(
    "messages, where",
    [
        (
            [
                *USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "and?"},
            ],
            "messages[1]",
        ),
        ([*USER, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], "messages[1]"),
    ],
)
def test_tool_messages_the_template_cannot_represent_are_400(server, messages, where):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client.chat.completions.create(model=server.base, messages=messages, max_tokens=4)
    assert caught.value.body["param"] == where and "no tool support" in caught.value.body["message"]

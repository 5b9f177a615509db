"""`tools` / `tool_choice`: function calls as constrained decoding, and what the template can represent.

- `none`: the model answers in text (tools are not rendered: no served template renders them).
- `required`: the output is constrained to `[{"name": <one of the tools>, "arguments": {...}}, ...]`
  (one call unless `parallel_tool_calls`), each `arguments` valid against that tool's `parameters`.
- a named function: the output is constrained to that function's `arguments` object.
- `auto`: needs a chat template that renders `tools` and a tool-call format to recognise; the served
  templates (SmolLM2's ChatML, the tiny test base) have none, so `auto` is a 400 that says so.

Messages with role `tool` or assistant messages carrying `tool_calls` need the same template support
and are refused by name otherwise. Tool names are bounded identifiers and every schema is bounded
by `GrammarSpec`, so nothing a tenant sends here is unbounded. Replies carry OpenAI's `tool_calls`
(ids, names, JSON `arguments`) with `finish_reason: "tool_calls"`, plain or as stream deltas.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.meta

from server.api.errors import BadRequest
from server.api.protocol import AssistantMessage, ChatCompletion, FunctionCall, ToolCall
from server.engine.grammar import GrammarError, GrammarSpec

MAX_TOOLS = 64
MAX_PARALLEL_CALLS = 8
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for decoding: `spec` constrains it; `named` is the forced function."""

    spec: GrammarSpec
    named: str | None  # the output is that function's arguments; None: a list of {"name", "arguments"}


def template_supports_tools(source: str) -> bool:
    """Whether the chat template reads a `tools` variable (the convention of HF's tool templates)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateSyntaxError:
        return False


def _functions(tools: Any) -> dict[str, dict]:
    """name -> parameters schema, after checking the definitions (400 naming the bad one)."""
    if not isinstance(tools, list) or not 0 < len(tools) <= MAX_TOOLS:
        raise BadRequest(f"tools must be a list of 1..{MAX_TOOLS} tool definitions", param="tools")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise BadRequest(f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest(
                f"{where}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
                param=f"{where}.function.name",
            )
        if name in out:
            raise BadRequest(f"{where}.function.name {name!r} is defined twice", param=f"{where}.function.name")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise BadRequest(
                f"{where}.function.parameters must be a JSON schema object", param=f"{where}.function.parameters"
            )
        out[name] = parameters
    return out


def _call_schema(functions: dict[str, dict], parallel: bool) -> dict:
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, parameters in functions.items()
    ]
    return {
        "type": "array",
        "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
        "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
    }


def check_tool_messages(messages: Any, supported: bool) -> None:
    """400 naming the first tool message or assistant tool call the template cannot represent."""
    if supported or not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool":
            raise BadRequest(
                f"messages[{i}].role 'tool': the base's chat template cannot represent tool results "
                "(it has no tool support)",
                param=f"messages[{i}]",
                code="invalid_messages",
            )
        if message.get("tool_calls"):
            raise BadRequest(
                f"messages[{i}].tool_calls: the base's chat template cannot represent tool calls "
                "(it has no tool support)",
                param=f"messages[{i}]",
                code="invalid_messages",
            )


def plan_tools(body, template_source: str) -> ToolPlan | None:
    """The decoding plan for `tools` / `tool_choice` (None: plain text); 400 naming what is wrong.

    Args:
        body: the chat request (`tools`, `tool_choice`, `parallel_tool_calls`, `messages`).
        template_source: the base's chat template.
    """
    supported = template_supports_tools(template_source)
    check_tool_messages(body.messages, supported)
    tools, choice = getattr(body, "tools", None), getattr(body, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return None
    functions = _functions(tools)
    if choice is None:
        choice = "auto"  # OpenAI's default when tools are present
    if choice == "none":
        return None
    if getattr(body, "response_format", None) not in (None, {"type": "text"}):
        raise BadRequest("response_format cannot be combined with a tool_choice that calls tools", param="tool_choice")
    try:
        if choice == "required":
            parallel = getattr(body, "parallel_tool_calls", None) is not False
            return ToolPlan(GrammarSpec.json_schema(_call_schema(functions, parallel)), None)
        if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            if name not in functions:
                raise BadRequest(
                    f"tool_choice names {str(name)[:64]!r}, which is not among the tools", param="tool_choice"
                )
            return ToolPlan(GrammarSpec.json_schema(functions[name]), name)
    except GrammarError as exc:
        raise BadRequest(f"tools: {exc}", param="tools", code="invalid_schema") from None
    if choice == "auto":
        raise BadRequest(
            "tool_choice 'auto' needs a chat template with tool support, and this base's template "
            "has none; use 'required' or name a function",
            param="tool_choice",
        )
    raise BadRequest(
        'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def tool_calls(plan: ToolPlan, text: str) -> list[ToolCall] | None:
    """The calls in a completed constrained output (None when it does not parse: cut by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    calls = [(plan.named, value)] if plan.named else [(call["name"], call["arguments"]) for call in value]
    return [
        ToolCall(
            index=i,
            id=f"call_{uuid.uuid4().hex[:24]}",
            type="function",
            function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)),
        )
        for i, (name, arguments) in enumerate(calls)
    ]


def as_tool_reply(plan: ToolPlan, completion: ChatCompletion) -> ChatCompletion:
    """A finished chat completion whose text is the constrained call(s) -> OpenAI's tool-call reply."""
    choice = completion.choices[0]
    calls = tool_calls(plan, choice.message.content or "") if choice.finish_reason == "stop" else None
    if calls is None:
        return completion  # cut short (length): the partial text is returned as it is
    for call in calls:
        call.index = None  # `index` belongs to stream deltas only
    choice.message = AssistantMessage(content=None, tool_calls=calls)
    choice.finish_reason = "tool_calls"
    return completion

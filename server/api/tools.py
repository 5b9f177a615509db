"""`tools` / `tool_choice`: function calls as constrained decoding, and what the template can represent.

- `none`: the model answers in text (tools are not rendered: no served template renders them).
- `required`: the output is constrained to `[{"name": <one of the tools>, "arguments": {...}}, ...]`
  (one call unless `parallel_tool_calls`), each `arguments` valid against that tool's `parameters`.
- a named function: the output is constrained to that function's `arguments` object.
- `auto`: needs a chat template that renders `tools` and writes a tool-call format we recognise
  (`tool_format.py`: Hermes / Qwen2.5). The output is free; a completion that ends in well-formed
  calls of offered functions becomes a tool-call reply, anything else stays content. Without
  tool support (SmolLM2's ChatML, the tiny test base) or with an unknown format, `auto` is a 400.

Whenever the template renders `tools`, the request's tools are rendered through it, and so are
messages with role `tool` and assistant messages carrying `tool_calls` (every string in them as
plain text, `ChatTemplate.render`); without tool support those messages are refused by name. Tool names are bounded identifiers and every schema is bounded
by `GrammarSpec`, so nothing a tenant sends here is unbounded. Replies carry OpenAI's `tool_calls`
(ids, names, JSON `arguments`) with `finish_reason: "tool_calls"`, plain or as stream deltas.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from adapters.chat_template import reads_tools
from adapters.tool_messages import MAX_JSON_DEPTH, json_depth
from server.api.errors import BadRequest
from server.api.protocol import AssistantMessage, ChatCompletion, FunctionCall, ToolCall
from server.api.tool_format import ToolCallFormat, detect_format, parse_calls
from server.engine.grammar import GrammarError, GrammarSpec

MAX_TOOLS = 64
MAX_PARALLEL_CALLS = 8
MAX_DESCRIPTION_CHARS = 4096
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for decoding: `spec` constrains it; `named` is the forced function;
    `auto` is the text format to recognise calls in when the output is free (`spec` None)."""

    spec: GrammarSpec | None
    named: str | None  # the output is that function's arguments; None: a list of {"name", "arguments"}
    auto: ToolCallFormat | None = None
    functions: frozenset[str] = frozenset()


@functools.lru_cache(maxsize=16)
def template_supports_tools(source: str) -> bool:
    """Whether the chat template reads a `tools` variable (the convention of HF's tool templates).

    Cached by source: it parses the whole template (~10 ms of the event loop's time), and every chat
    request asks about the one base template (a profile of 16 streamed requests: 0.46 of the event
    loop's 1.43 CPU seconds went to this parse)."""
    return reads_tools(source)


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
        if json_depth(tool) > MAX_JSON_DEPTH:  # the whole definition may be rendered (and recursed over)
            raise BadRequest(f"{where} may be nested at most {MAX_JSON_DEPTH} deep", param="tools")
        try:
            GrammarSpec.json_schema(parameters)  # plain JSON, bounded size: it may be rendered into the prompt
        except GrammarError as exc:
            raise BadRequest(f"{where}.function.parameters: {exc}", param="tools", code="invalid_schema") from None
        description = function.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise BadRequest(
                f"{where}.function.description must be a string of at most {MAX_DESCRIPTION_CHARS} characters",
                param=f"{where}.function.description",
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
    """400 naming the first tool message or assistant tool call a template without tool support
    cannot represent (with support, `ChatTemplate.validate` checks and renders them)."""
    if supported or not isinstance(messages, list):
        return
    why = "it has no tool support"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            continue
        if message.get("role") == "tool":
            raise BadRequest(
                f"messages[{i}].role 'tool': the base's chat template cannot represent tool results ({why})",
                param=f"messages[{i}]",
                code="invalid_messages",
            )
        if message.get("tool_calls"):
            raise BadRequest(
                f"messages[{i}].tool_calls: the base's chat template cannot represent tool calls ({why})",
                param=f"messages[{i}]",
                code="invalid_messages",
            )


def template_tools(body: Any, template_source: str) -> list[dict] | None:
    """The request's tools to render through the template (None: no tools, or it cannot render them).

    Called after `plan_tools`, which has checked the definitions."""
    tools = getattr(body, "tools", None)
    return tools if tools and template_supports_tools(template_source) else None


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
        return _auto_plan(template_source, supported, functions)
    raise BadRequest(
        'tool_choice must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


def _auto_plan(template_source: str, supported: bool, functions: dict[str, dict]) -> ToolPlan:
    if not supported:
        raise BadRequest(
            "tool_choice 'auto' needs a chat template with tool support, and this base's template "
            "has none; use 'required' or name a function",
            param="tool_choice",
        )
    fmt = detect_format(template_source)
    if fmt is None:
        raise BadRequest(
            "tool_choice 'auto': the base's chat template renders tools, but its tool-call format is "
            "not one this server recognises (hermes); use 'required' or name a function",
            param="tool_choice",
        )
    return ToolPlan(None, None, auto=fmt, functions=frozenset(functions))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


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
            id=new_call_id(),
            type="function",
            function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)),
        )
        for i, (name, arguments) in enumerate(calls)
    ]


def auto_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ToolCall]] | None:
    """(content, calls) when a free output ends in well-formed calls of offered functions, else None."""
    if plan.auto is None:
        return None
    parsed = parse_calls(plan.auto, text, set(plan.functions))
    if parsed is None:
        return None
    content, calls = parsed
    return content, [
        ToolCall(
            index=i,
            id=new_call_id(),
            type="function",
            function=FunctionCall(name=call.name, arguments=call.arguments),
        )
        for i, call in enumerate(calls)
    ]


def as_tool_reply(plan: ToolPlan, completion: ChatCompletion) -> ChatCompletion:
    """A finished chat completion whose text is the call(s) -> OpenAI's tool-call reply (constrained
    output, or `auto`'s recognised calls); otherwise the completion as it is."""
    choice = completion.choices[0]
    content: str | None = None
    if plan.auto is not None:
        found = auto_calls(plan, choice.message.content or "") if choice.finish_reason == "stop" else None
        content, calls = found if found is not None else (None, None)
    else:
        calls = tool_calls(plan, choice.message.content or "") if choice.finish_reason == "stop" else None
    if calls is None:
        return completion  # no calls, or cut short (length): the text is returned as it is
    for call in calls:
        call.index = None  # `index` belongs to stream deltas only
    choice.message = AssistantMessage(content=content, tool_calls=calls)
    choice.finish_reason = "tool_calls"
    return completion

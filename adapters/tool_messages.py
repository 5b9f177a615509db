"""Tool traffic inside a conversation, as OpenAI sends it: assistant messages carrying `tool_calls`
and `tool` messages carrying results. Checked and normalised here for templates with tool support
(`ChatTemplate`); every string in them is client text and is rendered as plain text there.

Arguments arrive as JSON text (OpenAI's wire form) and are handed to the template as an object (what
HF's tool templates expect, e.g. Qwen2.5's `tool_call.arguments | tojson`).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_CALLS_PER_MESSAGE = 16
MAX_JSON_DEPTH = 32  # nesting of tool parameters and arguments; templates and json recurse over them
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (a scalar is 0), computed without recursion."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
    return deepest


def tool_calls(value: Any, where: str, error: type[Exception]) -> list[dict]:
    """An assistant message's `tool_calls`, normalised to `[{"id", "type", "function": {"name", "arguments": {...}}}]`.

    Args:
        value: the message's `tool_calls`.
        where: the message's name in errors, e.g. "messages[2]".
        error: the exception to raise (the template's error type).
    """
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CALLS_PER_MESSAGE:
        raise error(f"{where}.tool_calls must be a list of 1..{MAX_CALLS_PER_MESSAGE} calls")
    calls = []
    for i, call in enumerate(value):
        at = f"{where}.tool_calls[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise error(f'{at} must be {{"type": "function", "function": {{"name", "arguments"}}}}')
        name, arguments = function.get("name"), function.get("arguments", "{}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise error(f"{at}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _, . or -")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise error(f"{at}.function.arguments must be JSON text of an object") from None
        if not isinstance(arguments, dict) or json_depth(arguments) > MAX_JSON_DEPTH:
            raise error(f"{at}.function.arguments must be a JSON object nested at most {MAX_JSON_DEPTH} deep")
        call_id = call.get("id", "")
        if not isinstance(call_id, str) or len(call_id) > 64:
            raise error(f"{at}.id must be a string of at most 64 characters")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def tool_call_id(message: dict, where: str, error: type[Exception]) -> str:
    """A tool message's `tool_call_id` ("" when absent)."""
    value = message.get("tool_call_id", "")
    if not isinstance(value, str) or len(value) > 64:
        raise error(f"{where}.tool_call_id must be a string of at most 64 characters")
    return value

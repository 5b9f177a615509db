"""Tool calls written as text by the model (`tool_choice: "auto"`): which formats are recognised,
how a template's format is detected, and parsing a completion into content + calls.

Recognised: the Hermes format (NousResearch Hermes 2 Pro, Qwen2.5 and others), one or more of

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

after optional text. A template is taken to use it when its source writes `<tool_call>`. In this
format the tags are plain text, so nothing here creates control tokens; a format whose tags are
special tokens would only ever see them from the model's output (client text is tokenized as text).

A completion is a tool-call reply only when everything from the first opener on is well-formed
calls of offered functions separated by whitespace; otherwise it stays plain content (OpenAI's
behaviour: a malformed call is not an error).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCallFormat:
    """A text format of tool calls: each call is `opener` JSON `closer`."""

    name: str
    opener: str
    closer: str


HERMES = ToolCallFormat("hermes", "<tool_call>", "</tool_call>")
FORMATS = (HERMES,)


def detect_format(template_source: str) -> ToolCallFormat | None:
    """The recognised format a tool-capable template writes (None: none we recognise)."""
    for fmt in FORMATS:
        if fmt.opener in template_source and fmt.closer in template_source:
            return fmt
    return None


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def parse_calls(fmt: ToolCallFormat, text: str, functions: set[str]) -> tuple[str | None, list[ParsedCall]] | None:
    """(content before the first call or None when blank, calls) if `text` ends in well-formed calls
    of `functions`; None when it has no call or any call is malformed (then it is plain content).
    """
    start = text.find(fmt.opener)
    if start < 0:
        return None
    calls: list[ParsedCall] = []
    rest = text[start:]
    pattern = re.compile(re.escape(fmt.opener) + r"(.*?)" + re.escape(fmt.closer), re.DOTALL)
    position = 0
    while True:
        while position < len(rest) and rest[position].isspace():
            position += 1
        if position == len(rest):
            break
        match = pattern.match(rest, position)
        call = _call(match.group(1), functions) if match else None
        if match is None or call is None:
            return None
        calls.append(call)
        position = match.end()
    content = text[:start]
    return (content if content.strip() else None), calls


def _call(body: str, functions: set[str]) -> ParsedCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) - {"name", "arguments"}:
        return None
    name, arguments = value.get("name"), value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if name not in functions or not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


def opener_prefix_at_end(fmt: ToolCallFormat, text: str) -> int:
    """Length of the longest tail of `text` that could be the start of the opener (held back
    while streaming, since the opener may arrive split over several tokens)."""
    for length in range(min(len(fmt.opener) - 1, len(text)), 0, -1):
        if fmt.opener.startswith(text[-length:]):
            return length
    return 0

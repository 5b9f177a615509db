"""SSE token lines built from a template (server/api/sse_template.py) equal the pydantic path byte for byte."""

from __future__ import annotations

import json

import pytest

from server.api.sse import sse_line as _sse_line
from server.api.protocol import ChatCompletionChunk, ChunkChoice, Delta
from server.api.sse_template import TextLines

TEXTS = [
    "",
    "plain",
    'quote " and \\ backslash',
    "new\nline\ttab",
    "héllo ✓ 日本語 😀",
    "\u2028\u2029",
    "\x00\x1f",
    "{}[]",
]


def _model_line(text: str, include_usage: bool) -> str:
    chunk = ChatCompletionChunk(
        id="chatcmpl-1", created=7, model="m/é", choices=[ChunkChoice(delta=Delta(content=text))]
    )
    return _sse_line(chunk, include_usage)


@pytest.mark.parametrize("include_usage", [False, True])
def test_template_lines_equal_the_model_path(include_usage):
    lines = TextLines(lambda text: _model_line(text, include_usage))
    for text in TEXTS:
        assert lines(text) == _model_line(text, include_usage)
        payload = json.loads(lines(text)[len("data: ") :])
        assert payload["choices"][0]["delta"]["content"] == text
        assert ("usage" in payload) == include_usage


def test_a_render_without_the_text_is_refused():
    with pytest.raises(ValueError):
        TextLines(lambda text: "data: {}\n\n")

"""Server-sent event lines built without pydantic per token: a template cut from the model's own line.

A streamed completion sends one `data: {...}` line per token that differ only in the text. Building
each through a pydantic model, `model_dump` and `json.dumps` costs tens of microseconds of the event
loop per token per stream; here the line is rendered ONCE through the normal path with a sentinel
text, cut at the sentinel's JSON encoding, and each token's line is then `head + json string + tail`.
The bytes are those the model path would send, by construction (same encoder, same key order).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring  # what json.dumps(str, ensure_ascii=False) calls

_SENTINEL = "\x00loraswap-sse-sentinel\x00"


class TextLines:
    """`lines(text)` -> the SSE line `render(_SENTINEL)` would give with `text` in its place.

    Args:
        render: builds one full SSE line for a text through the ordinary (pydantic) path; it must
            encode strings as `json.dumps(..., ensure_ascii=False)` does.
    """

    __slots__ = ("head", "tail")

    def __init__(self, render: Callable[[str], str]):
        line = render(_SENTINEL)
        encoded = json.dumps(_SENTINEL, ensure_ascii=False)
        if line.count(encoded) != 1:
            raise ValueError("the rendered line must hold the text exactly once")
        self.head, self.tail = line.split(encoded)

    def __call__(self, text: str) -> str:
        return self.head + encode_basestring(text) + self.tail

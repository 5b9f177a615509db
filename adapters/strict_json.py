"""JSON parsing for untrusted adapter files: no duplicate keys, no NaN/Infinity constants.

Python's `json` keeps the last of duplicate keys and accepts `NaN`; either lets two readers of
the same file disagree about its meaning, so uploads are parsed with this instead.
"""

from __future__ import annotations

import json
from typing import Any


def loads_strict(data: bytes | str) -> Any:
    """`json.loads` that raises ValueError on duplicate keys and non-finite constants."""
    if isinstance(data, bytes):
        data = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        return json.loads(data, object_pairs_hook=_unique_object, parse_constant=_refuse_constant)
    except RecursionError:  # `[[[[...` a million deep would otherwise escape as a crash
        raise ValueError("JSON nested too deeply") from None


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")

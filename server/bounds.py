"""Cheap structural bounds on a chat request, checked before anything renders or tokenizes it.

pydantic bounds each field's own range (server/api/protocol.py); what depends on the server's
settings is checked here: the message count, the characters of content across all messages, and
the completion length against the model length. Each failure is a 400 `invalid_request` whose
`param` names the field, so a hostile request costs one linear pass and never reaches a worker.
"""

from __future__ import annotations

from typing import Any

from server.errors import BadRequest
from server.limits import Limits


def check_messages(messages: list[dict[str, Any]], limits: Limits) -> None:
    """At most `max_messages` messages and `max_prompt_chars` characters of strings in them."""
    if len(messages) > limits.max_messages:
        raise BadRequest(
            f"a request may hold at most {limits.max_messages} messages, got {len(messages)}", param="messages"
        )
    total = 0
    pending: list[Any] = list(messages)
    while pending:  # a stack, not recursion: nesting depth is the client's choice
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
            if total > limits.max_prompt_chars:
                raise BadRequest(
                    f"the messages may hold at most {limits.max_prompt_chars} characters in total", param="messages"
                )
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def check_lengths(
    max_tokens: int | None, max_completion_tokens: int | None, min_tokens: int, max_model_len: int
) -> None:
    """Completion lengths within [1, max_model_len] and `min_tokens` within [0, max_tokens]."""
    for name, value in (("max_tokens", max_tokens), ("max_completion_tokens", max_completion_tokens)):
        if value is not None and value > max_model_len:
            raise BadRequest(f"{name} may be at most {max_model_len} (the model length), got {value}", param=name)
    wanted = max_completion_tokens or max_tokens
    if wanted is not None and min_tokens > wanted:
        raise BadRequest(f"min_tokens ({min_tokens}) may not exceed max_tokens ({wanted})", param="min_tokens")

"""What the chat and legacy completion routes share around a response: SSE lines, the streaming
response that owns its generations, the plain path's disconnect watch, and `usage`.

The per-token loops that turn engine events into chunks stay with each route; this module holds
the frame around them, so both routes end a stream, report a failure and count usage the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from contextlib import AbstractContextManager
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from adapters.errors import LoraswapError
from server.api.completion_protocol import Completion
from server.api.protocol import ChatCompletionChunk, PromptTokensDetails, Usage

DONE = "data: [DONE]\n\n"


def sse_line(chunk: ChatCompletionChunk | Completion, include_usage: bool) -> str:
    """One `data:` line of a chunk with `choices` and `usage` (chat or legacy shape).

    OpenAI sends `finish_reason: null` explicitly, and with `include_usage` every chunk carries
    `usage` (null but on the last).
    """
    payload = chunk.model_dump(exclude_none=True)
    if include_usage:
        payload["usage"] = chunk.usage.model_dump() if chunk.usage else None
    reasons = [choice.finish_reason for choice in chunk.choices]
    for reason, raw in zip(reasons, payload["choices"]):
        raw["finish_reason"] = reason  # OpenAI sends an explicit null
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_line(error: LoraswapError) -> str:
    """A stream's failure after its 200 went out: the error envelope as the last data line."""
    return f"data: {json.dumps(error.envelope())}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
    """OpenAI's usage; `cached_tokens`: prompt tokens served from the prefix cache."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(collect: Awaitable[Any], request: Request) -> Any:
    """`collect`'s result, or a 499 once the client has gone (then `collect` is cancelled; the
    caller's `with` block around this aborts the engine requests)."""
    task, watch = asyncio.ensure_future(collect), asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()  # the client left (or we are being cancelled)
    if task not in done:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    return task.result()


class EventStream(StreamingResponse):
    """An SSE response that owns its generations while it sends: however the send ends (finished,
    client gone, even never started), leaving `with owner:` releases them.

    Args:
        content: the SSE lines.
        owner: a `Generation` or an `ExitStack` holding several.
    """

    def __init__(self, content, owner: AbstractContextManager):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._owner = owner

    async def __call__(self, scope, receive, send) -> None:
        with self._owner:
            await super().__call__(scope, receive, send)

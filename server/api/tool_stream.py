"""Streaming a constrained tool call in OpenAI's delta shape.

A named function's output *is* its arguments, so they stream as they are generated: one delta with
the call's id, type and name (arguments ""), then argument fragments, then `finish_reason:
"tool_calls"`. With `required` the output is a list of calls whose names come first inside the
JSON, so the calls are sent once the list is complete (a name delta and an arguments delta each).
"""

from __future__ import annotations

import time
import uuid

from server.api.abort import abort_error
from server.api.protocol import ChatCompletionChunk, ChunkChoice, Delta, FunctionCall, ToolCall
from server.api.sse import DONE, error_line, sse_line, usage
from server.api.tools import ToolPlan, tool_calls


async def tool_sse(body, generation, include_usage: bool, plan: ToolPlan):
    """The SSE lines of a tool-call reply; the response sending them owns `generation` (`sse.EventStream`)."""
    created = int(time.time())

    def chunk(delta: Delta, finish_reason=None) -> str:
        return sse_line(
            ChatCompletionChunk(
                id=generation.request_id,
                created=created,
                model=body.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
            ),
            include_usage,
        )

    def call_delta(index: int, **fields) -> Delta:
        return Delta(tool_calls=[ToolCall(index=index, **fields)])

    yield chunk(Delta(role="assistant"))
    text = []
    if plan.named:
        yield chunk(
            call_delta(
                0,
                id=f"call_{uuid.uuid4().hex[:24]}",
                type="function",
                function=FunctionCall(name=plan.named, arguments=""),
            )
        )
    async for event in generation.events():
        text.append(event.text)
        if plan.named and event.text:
            yield chunk(call_delta(0, function=FunctionCall(arguments=event.text)))
    reason = generation.finish_reason
    if reason == "abort":
        yield error_line(abort_error(generation))
        yield DONE
        return
    calls = tool_calls(plan, "".join(text)) if reason == "stop" else None
    if not plan.named:
        if calls is None:  # cut short: the partial text, as content
            yield chunk(Delta(content="".join(text)))
        for call in calls or ():
            yield chunk(
                call_delta(
                    call.index or 0,
                    id=call.id,
                    type="function",
                    function=FunctionCall(name=call.function.name, arguments=""),
                )
            )
            yield chunk(call_delta(call.index or 0, function=FunctionCall(arguments=call.function.arguments)))
    yield chunk(Delta(), finish_reason="tool_calls" if calls is not None else reason)
    if include_usage:
        yield sse_line(
            ChatCompletionChunk(
                id=generation.request_id,
                created=created,
                model=body.model,
                choices=[],
                usage=usage(len(generation.prompt_ids), generation.completion_tokens),
            ),
            include_usage,
        )
    yield DONE

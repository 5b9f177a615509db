"""Streaming tool calls in OpenAI's delta shape: constrained calls, and `auto`'s recognised ones.

A named function's output *is* its arguments, so they stream as they are generated: one delta with
the call's id, type and name (arguments ""), then argument fragments, then `finish_reason:
"tool_calls"`. With `required` the output is a list of calls whose names come first inside the
JSON, so the calls are sent once the list is complete (a name delta and an arguments delta each).
With `auto` the text streams as content until the format's opener appears (a tail that could be
the start of an opener is held back); from there it is buffered, and at the end sent as calls if
it parses as calls of offered functions, else as the content it is.
"""

from __future__ import annotations

import time
import uuid

from server.api.abort import abort_error
from server.api.protocol import ChatCompletionChunk, ChunkChoice, Delta, FunctionCall, ToolCall
from server.api.sse import DONE, error_line, sse_line, usage
from server.api.tool_format import opener_prefix_at_end
from server.api.tools import ToolPlan, auto_calls, tool_calls


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

    if plan.auto is not None:
        async for line in _auto_sse(generation, plan, chunk, call_delta):
            yield line
        if generation.finish_reason != "abort":
            async for line in _usage_and_done(body, generation, include_usage, created):
                yield line
        return
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
    async for line in _usage_and_done(body, generation, include_usage, created):
        yield line


async def _usage_and_done(body, generation, include_usage: bool, created: int):
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


async def _auto_sse(generation, plan: ToolPlan, chunk, call_delta):
    """`auto`: content until a call opener, then the calls (or the held text) and the finish chunk."""
    assert plan.auto is not None
    opener = plan.auto.opener
    yield chunk(Delta(role="assistant", content=""))
    pending = ""  # text not yet sent: a possible opener's start, or everything from an opener on
    held: list[str] = []  # once an opener appeared: the rest of the output
    sent: list[str] = []  # content already streamed
    async for event in generation.events():
        if held:
            held.append(event.text)
            continue
        pending += event.text
        start = pending.find(opener)
        if start >= 0:
            if start:
                sent.append(pending[:start])
                yield chunk(Delta(content=pending[:start]))
            held.append(pending[start:])
            continue
        safe = len(pending) - opener_prefix_at_end(plan.auto, pending)
        if safe:
            sent.append(pending[:safe])
            yield chunk(Delta(content=pending[:safe]))
            pending = pending[safe:]
    reason = generation.finish_reason
    if reason == "abort":
        yield error_line(abort_error(generation))
        yield DONE
        return
    rest = "".join(held) if held else pending
    found = auto_calls(plan, "".join(sent) + rest) if held and reason == "stop" else None
    if found is None:
        if rest:
            yield chunk(Delta(content=rest))
        yield chunk(Delta(), finish_reason=reason or "stop")
        return
    for call in found[1]:
        index = call.index or 0
        yield chunk(
            call_delta(index, id=call.id, type="function", function=FunctionCall(name=call.function.name, arguments=""))
        )
        yield chunk(call_delta(index, function=FunctionCall(arguments=call.function.arguments)))
    yield chunk(Delta(), finish_reason="tool_calls")

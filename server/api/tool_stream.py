"""Streaming a constrained tool call in OpenAI's delta shape.

A named function's output *is* its arguments, so they stream as they are generated: one delta with
the call's id, type and name (arguments ""), then argument fragments, then `finish_reason:
"tool_calls"`. With `required` the output is a list of calls whose names come first inside the
JSON, so the calls are sent once the list is complete (a name delta and an arguments delta each).
"""

from __future__ import annotations

import json
import time
import uuid

from server.api.abort import abort_error
from server.api.protocol import ChatCompletionChunk, ChunkChoice, Delta, FunctionCall, ToolCall, Usage
from server.api.tools import ToolPlan, tool_calls


def _line(chunk: ChatCompletionChunk, include_usage: bool) -> str:
    payload = chunk.model_dump(exclude_none=True)
    if include_usage:
        payload["usage"] = chunk.usage.model_dump() if chunk.usage else None
    for choice, raw in zip(chunk.choices, payload["choices"]):
        raw["finish_reason"] = choice.finish_reason  # OpenAI sends an explicit null
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def tool_sse(body, generation, include_usage: bool, plan: ToolPlan):
    """The SSE lines of a tool-call reply; the response sending them owns `generation` (`chat._EventStream`)."""
    created = int(time.time())

    def chunk(delta: Delta, finish_reason=None) -> str:
        return _line(
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
        yield f"data: {json.dumps(abort_error(generation).envelope())}\n\n"
        yield "data: [DONE]\n\n"
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
        prompt = len(generation.prompt_ids)
        usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=generation.completion_tokens,
            total_tokens=prompt + generation.completion_tokens,
        )
        yield _line(
            ChatCompletionChunk(id=generation.request_id, created=created, model=body.model, choices=[], usage=usage),
            include_usage,
        )
    yield "data: [DONE]\n\n"

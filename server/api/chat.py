"""`POST /v1/chat/completions`: OpenAI chat completions over the engine, plain or streamed (SSE).

The path of a request (after `server.edge` authenticated it and capped its body): field bounds
(400 naming the field) -> resolve `model` in the caller's namespace (404 otherwise) -> validate,
render and length-check the messages off the event loop (the same path as `/tokenize`) -> resolve
`model` again -> admission (429 / 503) -> engine (`admit.py`, shared with the legacy route). The `Generation` owns the request's lifetime: the
plain path runs inside `with generation:`, the streaming response sends inside it (`sse.EventStream`).
A client that goes away is noticed while waiting (plain) or by Starlette's disconnect listener
(streaming); either way the consuming task is cancelled and leaving the block aborts the engine
request, freeing its KV blocks and slot pin.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request

from server.api.abort import abort_error
from server.api.admit import check_request, resolve, start_generations
from server.api.decoding import decoding_controls
from server.api.deps import get_state, get_tenant
from server.api.errors import BadRequest
from server.api.parallel import check_n, parallel_chat
from server.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    Choice,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
)
from server.api.request_fields import CHAT_FIELDS
from server.api.sampling import sampling_params
from server.api.sse import DONE, EventStream, error_line, sse_line, unless_disconnected, usage
from server.api.sse_template import TextLines
from server.api.tool_stream import tool_sse
from server.api.tools import as_tool_reply, plan_tools, template_tools
from server.bounds import check_lengths
from server.engine.types import TokenEvent
from server.generation import Generation
from server.state import ServerState

router = APIRouter()


def _token_logprob(tokenizer, event: TokenEvent, as_ids: bool) -> TokenLogprob:
    """OpenAI's per-token logprob entry; with `as_ids` tokens are named "token_id:<id>" (vLLM)."""

    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {
            "token": f"token_id:{token_id}" if as_ids else text,
            "logprob": logprob,
            "bytes": list(text.encode("utf-8")),
        }

    if event.token_id is None:
        raise ValueError("an event without a token has no logprob")  # callers check; a bug otherwise
    top = [TopLogprob(**entry(t, lp)) for t, lp in event.top_logprobs]
    chosen = entry(event.token_id, event.logprob if event.logprob is not None else 0.0)
    return TokenLogprob(**chosen, top_logprobs=top)


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    tenant: str = Depends(get_tenant),
    state: ServerState = Depends(get_state),
):
    check_request(body, CHAT_FIELDS)
    if body.chat_template is not None or body.chat_template_kwargs:
        raise BadRequest("a request may not supply its own chat template; the base's is used", param="chat_template")
    check_lengths(body.max_tokens, body.max_completion_tokens, body.min_tokens, state.max_model_len)
    first = await resolve(state, tenant, body)  # 404 / the mix's checks before the expensive work
    plan = plan_tools(body, state.template.source)  # None unless tool calls constrain the output
    check_n(body, state.config.limits.max_n, constrained=plan is not None)
    prompt, max_tokens = await state.render_prompt(
        body.messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        tools=template_tools(body, state.template.source),
    )
    controls = await decoding_controls(body, state, tenant, plan.spec if plan else None)
    sampling = sampling_params(
        body,
        max_tokens,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        stop_token_ids=() if body.ignore_eos else state.template.end_of_turn_ids,
        controls=controls,
    )
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    if body.n > 1:
        return await parallel_chat(
            state,
            body,
            request,
            tenant=tenant,
            first=first,
            prompt_ids=prompt.ids,
            sampling=sampling,
            request_id=request_id,
            token_logprob=_token_logprob,
        )
    (generation,), owned = await start_generations(state, tenant, body, first, [(request_id, prompt.ids, sampling)])
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if plan is not None:
            return EventStream(tool_sse(body, generation, include_usage, plan), owned)
        return EventStream(_sse(state, body, generation, include_usage), owned)
    with owned:
        result = await unless_disconnected(_collect(state, body, generation), request)
    return as_tool_reply(plan, result) if plan is not None and isinstance(result, ChatCompletion) else result


async def _collect(state: ServerState, body: ChatCompletionRequest, generation: Generation) -> ChatCompletion:
    texts: list[str] = []
    logprobs: list[TokenLogprob] = []
    completion_tokens = 0
    async for event in generation.events():
        texts.append(event.text)
        if body.logprobs and event.token_id is not None:
            logprobs.append(_token_logprob(state.tokenizer, event, body.return_tokens_as_token_ids))
        completion_tokens = max(event.completion_tokens, generation.completion_tokens)
    if generation.finish_reason == "abort":
        raise abort_error(generation)
    return ChatCompletion(
        id=generation.request_id,
        created=int(time.time()),
        model=body.model,
        choices=[
            Choice(
                message=AssistantMessage(content="".join(texts)),
                logprobs=ChoiceLogprobs(content=logprobs) if body.logprobs else None,
                finish_reason=generation.finish_reason or "stop",  # events() always sets it
            )
        ],
        usage=usage(len(generation.prompt_ids), completion_tokens, generation.cached_tokens),
    )


async def _sse(state: ServerState, body: ChatCompletionRequest, generation: Generation, include_usage: bool):
    created = int(time.time())

    def chunk(delta: Delta, finish_reason=None, logprobs=None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return sse_line(
            ChatCompletionChunk(id=generation.request_id, created=created, model=body.model, choices=[choice]),
            include_usage,
        )

    yield chunk(Delta(role="assistant", content=""))
    text_line = TextLines(lambda text: chunk(Delta(content=text)))  # a token's line without pydantic
    completion_tokens = 0
    async for event in generation.events():
        completion_tokens = max(event.completion_tokens, generation.completion_tokens)
        if body.logprobs and event.token_id is not None:
            logprobs = ChoiceLogprobs(content=[_token_logprob(state.tokenizer, event, body.return_tokens_as_token_ids)])
            yield chunk(Delta(content=event.text), logprobs=logprobs)
        elif event.text:
            yield text_line(event.text)
    if generation.finish_reason == "abort":
        yield error_line(abort_error(generation))
    else:
        yield chunk(Delta(), finish_reason=generation.finish_reason or "stop")
        if include_usage:
            last = ChatCompletionChunk(
                id=generation.request_id,
                created=created,
                model=body.model,
                choices=[],
                usage=usage(len(generation.prompt_ids), completion_tokens, generation.cached_tokens),
            )
            yield sse_line(last, include_usage)
    yield DONE

"""`POST /v1/chat/completions`: OpenAI chat completions over the engine, plain or streamed (SSE).

The path of a request (after `server.edge` authenticated it and capped its body): field bounds
(400 naming the field) -> resolve `model` in the caller's namespace (404 otherwise) -> validate,
render and length-check the messages off the event loop (the same path as `/tokenize`) -> resolve
`model` again -> admission (429 / 503) -> engine. The `Generation` owns the request's lifetime: the
plain path runs inside `with generation:`, the streaming response sends inside it (`_EventStream`).
A client that goes away is noticed while waiting (plain) or by Starlette's disconnect listener
(streaming); either way the consuming task is cancelled and leaving the block aborts the engine
request, freeing its KV blocks and slot pin.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.api.decoding import decoding_controls
from server.api.deps import get_state, get_tenant
from server.api.abort import abort_error
from server.api.errors import BadRequest
from server.bounds import check_lengths
from server.limits import GREEDY_BELOW
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
    Usage,
)
from server.api.request_fields import check_fields
from server.api.sse import TextLines
from server.api.tool_stream import tool_sse
from server.api.tools import as_tool_reply, plan_tools
from server.engine.types import SamplingParams, TokenEvent
from server.generation import Generation
from server.state import ServerState

router = APIRouter()


def sampling_params(
    body: ChatCompletionRequest, max_tokens: int, end_of_turn_ids: list[int], **controls
) -> SamplingParams:
    """OpenAI request fields -> engine `SamplingParams` (400 naming the field when out of range);
    `controls` are `decoding.decoding_controls`' penalties, logit_bias and grammar."""
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop strings must be non-empty", param="stop")
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0  # vLLM's -1 and 0 both mean off
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature < GREEDY_BELOW:
        temperature = 0.0  # greedy: dividing logits by a tiny temperature overflows to inf
    if body.min_tokens > max_tokens:
        raise BadRequest(
            f"min_tokens ({body.min_tokens}) may not exceed the completion length ({max_tokens})", param="min_tokens"
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=top_k,
            seed=body.seed,
            stop=stop,
            stop_token_ids=() if body.ignore_eos else tuple(end_of_turn_ids),
            ignore_eos=body.ignore_eos,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            **controls,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


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
    check_fields(body.model_dump(exclude_unset=True))  # every OpenAI field honoured or refused by name
    if body.chat_template is not None or body.chat_template_kwargs:
        raise BadRequest("a request may not supply its own chat template; the base's is used", param="chat_template")
    if body.n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    check_lengths(body.max_tokens, body.max_completion_tokens, body.min_tokens, state.max_model_len)
    state.resolve_model(tenant, body.model)  # 404 before any rendering
    plan = plan_tools(body, state.template.source)  # None unless tool calls constrain the output
    prompt, max_tokens = await state.render_prompt(
        body.messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    controls = await decoding_controls(body, state, tenant, plan.spec if plan else None)
    sampling = sampling_params(body, max_tokens, state.template.end_of_turn_ids, **controls)
    # Again after the render's and the grammar compile's awaits: the adapter may have been deleted
    # or re-uploaded meanwhile, and from here to `Generation` (which counts it in use) nothing awaits.
    model = state.resolve_model(tenant, body.model)
    ticket = state.admission.acquire(tenant)
    generation = Generation(
        state,
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        tenant=tenant,
        model=model,
        prompt_ids=prompt.ids,
        sampling=sampling,
        ticket=ticket,
    )
    generation.start()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if plan is not None:
            return _EventStream(tool_sse(body, generation, include_usage, plan), generation)
        return _EventStream(_sse(state, body, generation, include_usage), generation)
    with generation:
        result = await _complete_unless_disconnected(state, body, generation, request)
    return as_tool_reply(plan, result) if plan is not None and isinstance(result, ChatCompletion) else result


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _complete_unless_disconnected(state, body, generation: Generation, request: Request):
    collect = asyncio.ensure_future(_collect(state, body, generation))
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not collect.done():
            collect.cancel()  # the client left (or we are being cancelled); the caller's `with` aborts now
    if collect not in done:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    return collect.result()


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
    prompt_tokens = len(generation.prompt_ids)
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
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def _sse_line(chunk: ChatCompletionChunk, include_usage: bool) -> str:
    payload = chunk.model_dump(exclude_none=True)
    if include_usage:
        payload["usage"] = chunk.usage.model_dump() if chunk.usage else None
    for choice, raw in zip(chunk.choices, payload["choices"]):
        raw["finish_reason"] = choice.finish_reason  # OpenAI sends an explicit null
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(state: ServerState, body: ChatCompletionRequest, generation: Generation, include_usage: bool):
    created = int(time.time())

    def chunk(delta: Delta, finish_reason=None, logprobs=None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        return _sse_line(
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
        error = abort_error(generation)
        yield f"data: {json.dumps(error.envelope())}\n\n"
    else:
        yield chunk(Delta(), finish_reason=generation.finish_reason or "stop")
        if include_usage:
            prompt_tokens = len(generation.prompt_ids)
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            )
            last = ChatCompletionChunk(
                id=generation.request_id, created=created, model=body.model, choices=[], usage=usage
            )
            yield _sse_line(last, include_usage)
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that owns its generation while it sends: however the send ends (finished,
    client gone, even never started), leaving `with generation:` releases it."""

    def __init__(self, content, generation: Generation):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._generation = generation

    async def __call__(self, scope, receive, send) -> None:
        with self._generation:
            await super().__call__(scope, receive, send)

"""`n > 1` chat completions: several samples of one prompt, as one response with indexed choices.

Each choice is its own engine request (a `Generation`, holding its own admission ticket, so `n`
counts against the tenant's share like `n` requests). The engine computes the shared prompt once:
the first choice's prefill registers its full blocks in the prefix cache and the others, held
back while it computes them (scheduler `_computing_elsewhere`), start on those blocks, copy the
prompt's partial last block (copy on write) and compute only the last token. With `seed`, choice `i` samples with `seed + i`:
reproducible and distinct. Usage counts the prompt once and every choice's completion.
Streaming interleaves the choices' chunks as their tokens arrive, each chunk naming its `index`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from fastapi import Request

from server.api.abort import abort_error
from server.api.admit import start_generations
from server.api.errors import BadRequest
from server.api.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    Usage,
)
from server.api.sse import EventStream, unless_disconnected, usage
from server.engine.types import SamplingParams, TokenEvent
from server.generation import Generation
from server.state import ResolvedModel, ServerState

_SEEDS = 2**64


def check_n(body: ChatCompletionRequest, max_n: int, constrained: bool) -> None:
    """400 naming `n` unless 1 <= n <= max_n (`--limits.max_n`); tool calls take n = 1 only."""
    if not 1 <= body.n <= max_n:
        raise BadRequest(f"n must be between 1 and {max_n}, got {body.n}", param="n")
    if body.n > 1 and constrained:
        raise BadRequest("n > 1 is not supported with tool calls", param="n")


def choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s settings: `seed + index` (wrapped into the seed range), else unchanged."""
    if sampling.seed is None or index == 0:
        return sampling
    seed = (sampling.seed + index) % _SEEDS
    return dataclasses.replace(sampling, seed=seed - _SEEDS if seed >= _SEEDS // 2 else seed)


def choices_usage(generations: list[Generation]) -> Usage:
    """The prompt once (and the cached part of its one computation), every choice's completion."""
    cached = min(g.cached_tokens for g in generations)
    return usage(len(generations[0].prompt_ids), sum(g.completion_tokens for g in generations), cached)


async def parallel_chat(
    state: ServerState,
    body: ChatCompletionRequest,
    request: Request,
    *,
    tenant: str,
    first: ResolvedModel,
    prompt_ids: list[int],
    sampling: SamplingParams,
    request_id: str,
    token_logprob,
):
    """Start `body.n` generations and answer with all of them (plain or streamed).

    Args:
        first: the route's first resolution of `body` (admit.start_generations looks again).
        token_logprob: `chat._token_logprob` (tokenizer, event, as_ids) -> TokenLogprob.
    """
    runs = [(f"{request_id}-{i}", prompt_ids, choice_sampling(sampling, i)) for i in range(body.n)]
    generations, owned = await start_generations(state, tenant, body, first, runs)
    view = _Choices(state, body, request_id, generations, token_logprob)
    if body.stream:
        return EventStream(view.sse(), owned)
    with owned:  # leaving it aborts every choice, also when the client has gone
        return await unless_disconnected(view.collect(), request)


async def merged(generations: list[Generation]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from every generation, in arrival order."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for event in generation.events():
                await queue.put((index, event))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        remaining = len(tasks)
        while remaining:
            index, event = await queue.get()
            if event is None:
                remaining -= 1
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()


class _Choices:
    """The choices' events as one `chat.completion` or as `chat.completion.chunk`s."""

    def __init__(self, state, body: ChatCompletionRequest, request_id: str, generations, token_logprob):
        self.state, self.body, self.id, self.generations = state, body, request_id, generations
        self.token_logprob = token_logprob
        self.created = int(time.time())

    def _logprob(self, event: TokenEvent) -> TokenLogprob | None:
        if not self.body.logprobs or event.token_id is None:
            return None
        return self.token_logprob(self.state.tokenizer, event, self.body.return_tokens_as_token_ids)

    def _failure(self):
        for generation in self.generations:
            if generation.finish_reason == "abort":
                return abort_error(generation)
        return None

    async def collect(self) -> ChatCompletion:
        texts: list[list[str]] = [[] for _ in self.generations]
        logprobs: list[list[TokenLogprob]] = [[] for _ in self.generations]
        async for index, event in merged(self.generations):
            texts[index].append(event.text)
            entry = self._logprob(event)
            if entry is not None:
                logprobs[index].append(entry)
        failure = self._failure()
        if failure is not None:
            raise failure
        choices = [
            Choice(
                index=i,
                message=AssistantMessage(content="".join(texts[i])),
                logprobs=ChoiceLogprobs(content=logprobs[i]) if self.body.logprobs else None,
                finish_reason=g.finish_reason or "stop",
            )
            for i, g in enumerate(self.generations)
        ]
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.body.model,
            choices=choices,
            usage=choices_usage(self.generations),
        )

    def _line(self, choices: list[ChunkChoice], usage_: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.body.model, choices=choices)
        payload = chunk.model_dump(exclude_none=True)
        for choice, raw in zip(choices, payload["choices"]):
            raw["finish_reason"] = choice.finish_reason  # OpenAI sends an explicit null
        if self.body.stream_options and self.body.stream_options.include_usage:
            payload["usage"] = usage_.model_dump() if usage_ else None
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        for i in range(len(self.generations)):
            yield self._line([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
        async for index, event in merged(self.generations):
            entry = self._logprob(event)
            if event.text or entry is not None:
                logprobs = ChoiceLogprobs(content=[entry]) if entry is not None else None
                yield self._line([ChunkChoice(index=index, delta=Delta(content=event.text), logprobs=logprobs)])
            if event.finish_reason is not None and event.finish_reason != "abort":
                yield self._line([ChunkChoice(index=index, delta=Delta(), finish_reason=event.finish_reason)])
        failure = self._failure()
        if failure is not None:
            yield f"data: {json.dumps(failure.envelope())}\n\n"
        elif self.body.stream_options and self.body.stream_options.include_usage:
            yield self._line([], choices_usage(self.generations))
        yield "data: [DONE]\n\n"

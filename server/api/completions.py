"""`POST /v1/completions`: OpenAI's legacy text completions over the engine, plain or streamed.

The same path as chat minus the template: resolve `model` in the caller's namespace -> check the
fields -> tokenize each prompt *as plain text* (special-token strings in it stay text, so the
special-token invariant holds here too) and length-check it -> one admission ticket and one
engine request per prompt -> choices indexed like the prompts. A client that leaves aborts them all.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request

from server.api.completion_protocol import (
    MAX_PROMPTS,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from server.api.admit import check_request, resolve, start_generations
from server.api.decoding import decoding_controls
from server.api.deps import get_state, get_tenant
from server.api.abort import abort_error
from server.api.errors import BadRequest, PromptTooLong
from server.api.protocol import Usage
from server.api.request_fields import COMPLETION_FIELDS
from server.api.sampling import sampling_params
from server.api.sse import DONE, EventStream, error_line, sse_line, unless_disconnected, usage
from server.bounds import check_lengths
from server.generation import Generation
from server.state import ServerState

router = APIRouter()


def plain_prompts(prompt) -> list[str]:
    """The request's prompts as strings; 400 for token ids, empties or too many."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadRequest(
            "prompt must be a string or a non-empty list of strings (token-id prompts are not "
            "accepted: they could carry control tokens)",
            param="prompt",
        )
    if len(prompts) > MAX_PROMPTS:
        raise BadRequest(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    if any(not p for p in prompts):
        raise BadRequest("prompts must be non-empty", param="prompt")
    return prompts


def tokenize_plain(state: ServerState, text: str, max_tokens: int | None) -> tuple[list[int], int]:
    """Plain-text ids of `text` (special-token strings split) and the completion budget; 400 when too long."""
    ids = state.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    limit = state.max_model_len
    wanted = max_tokens if max_tokens is not None else max(limit - len(ids), 1)
    if len(ids) + wanted > limit:
        raise PromptTooLong(
            f"This model's maximum context length is {limit} tokens; the prompt takes {len(ids)} "
            f"tokens and {wanted} more were requested ({len(ids) + wanted} in total)",
            param="prompt",
        )
    return ids, wanted


@router.post("/v1/completions")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    tenant: str = Depends(get_tenant),
    state: ServerState = Depends(get_state),
):
    check_request(body, COMPLETION_FIELDS)
    if body.n not in (None, 1):
        raise BadRequest("only n=1 is supported on the legacy endpoint (chat completions serve n > 1)", param="n")
    if body.echo and body.logprobs is not None:
        raise BadRequest("echo with logprobs is not supported: prompt logprobs are not computed", param="echo")
    prompts = plain_prompts(body.prompt)
    check_lengths(body.max_tokens, None, body.min_tokens, state.max_model_len)
    first = await resolve(state, tenant, body)  # 404 / the mix's checks before the expensive work
    # Tokenizing costs time linear in the prompts: in the render pool, as chat's rendering.
    encoded = await state.pools.run(
        state.pools.render, lambda: [tokenize_plain(state, p, body.max_tokens) for p in prompts]
    )
    controls = await decoding_controls(body, state, tenant)
    samplings = [
        sampling_params(body, max_tokens, logprobs=body.logprobs, controls=controls) for _, max_tokens in encoded
    ]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    runs = [(f"{request_id}-{i}", ids, sampling) for i, ((ids, _), sampling) in enumerate(zip(encoded, samplings))]
    generations, owned = await start_generations(state, tenant, body, first, runs)
    view = _View(state, body, request_id, prompts, generations)
    if body.stream:
        return EventStream(view.sse(), owned)
    with owned:
        return await unless_disconnected(view.collect(), request)


class _View:
    """Turns the prompts' token events into OpenAI's `text_completion` objects or chunks."""

    def __init__(self, state, body: CompletionRequest, request_id: str, prompts: list[str], generations):
        self.state, self.body, self.id = state, body, request_id
        self.prompts, self.generations = prompts, generations
        self.created = int(time.time())

    async def events(self):
        """(prompt index, event) from every generation as they arrive."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, generation: Generation):
            try:
                async for event in generation.events():
                    await queue.put((index, event))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.generations)]
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

    def _logprobs(self, entries: list, offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for event in entries:
            token = self.state.tokenizer.decode([event.token_id])
            out.tokens.append(token)
            out.token_logprobs.append(event.logprob)
            out.top_logprobs.append(
                {self.state.tokenizer.decode([t]): lp for t, lp in event.top_logprobs} if self.body.logprobs else None
            )
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def _failure(self):
        for generation in self.generations:
            if generation.finish_reason == "abort":
                return abort_error(generation)
        return None

    def usage(self) -> Usage:
        return usage(
            sum(len(g.prompt_ids) for g in self.generations), sum(g.completion_tokens for g in self.generations)
        )

    async def collect(self) -> Completion:
        texts = [[self.prompts[i]] if self.body.echo else [] for i in range(len(self.prompts))]
        tokens: list[list] = [[] for _ in self.prompts]
        async for index, event in self.events():
            texts[index].append(event.text)
            if event.token_id is not None:
                tokens[index].append(event)
        failure = self._failure()
        if failure is not None:
            raise failure
        choices = [
            CompletionChoice(
                index=i,
                text="".join(texts[i]),
                finish_reason=g.finish_reason,
                logprobs=self._logprobs(tokens[i], 0) if self.body.logprobs is not None else None,
            )
            for i, g in enumerate(self.generations)
        ]
        return Completion(id=self.id, created=self.created, model=self.body.model, choices=choices, usage=self.usage())

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        chunk = Completion(id=self.id, created=self.created, model=self.body.model, choices=choices, usage=usage)
        return sse_line(chunk, include_usage)

    async def sse(self):
        offsets = [0] * len(self.prompts)
        if self.body.echo:
            for i, prompt in enumerate(self.prompts):
                yield self._chunk([CompletionChoice(index=i, text=prompt)])
        async for index, event in self.events():
            logprobs = None
            if self.body.logprobs is not None and event.token_id is not None:
                logprobs = self._logprobs([event], offsets[index])
            offsets[index] += len(event.text)
            if event.text or logprobs is not None or event.finish_reason is not None:
                reason = event.finish_reason if event.finish_reason != "abort" else None
                yield self._chunk(
                    [CompletionChoice(index=index, text=event.text, logprobs=logprobs, finish_reason=reason)]
                )
        failure = self._failure()
        if failure is not None:
            yield error_line(failure)
        elif self.body.stream_options and self.body.stream_options.include_usage:
            yield self._chunk([], usage=self.usage())
        yield DONE

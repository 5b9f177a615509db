"""From a checked completion request to running generations: the steps chat and legacy share.

`check_request` refuses what neither route honours (fields by policy);
`resolve` maps the request's `model` (and its `adapters` mix, server/mix.py) to the base, the
caller's adapter or a mix of the caller's adapters (404 otherwise); it is looked up twice per request: before the expensive work (render, tokenize, grammar compile), and again
inside `start_generations` after those awaits, because the adapter may have been deleted or
re-uploaded meanwhile. From that second look to the `Generation`s (which count the adapter in use)
nothing awaits.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from server.api.request_fields import FieldPolicy, check_fields
from server.engine.types import SamplingParams
from server.generation import Generation
from server.mix import resolve_again, resolve_request
from server.state import ResolvedModel, ServerState


def check_request(body: Any, fields: dict[str, FieldPolicy]) -> None:
    """400 naming the first refused OpenAI field (`n` is each route's: chat serves n > 1)."""
    check_fields(body.model_dump(exclude_unset=True), fields)  # every OpenAI field honoured or refused by name


async def resolve(state: ServerState, tenant: str, body: Any) -> ResolvedModel:
    """The base, `tenant`'s adapter or mix that `body` names; 404 for anything else (a new mix is
    also checked for rank and bounds, off the event loop)."""
    return await resolve_request(state, tenant, body.model, body.adapters)


async def start_generations(
    state: ServerState,
    tenant: str,
    body: Any,
    first: ResolvedModel,
    runs: list[tuple[str, list[int], SamplingParams]],
) -> tuple[list[Generation], ExitStack]:
    """Resolve `body` once more (404 if gone, 409 if a mix's adapter changed since `first`), then
    admit and start one `Generation` per run.

    Args:
        first: what `resolve` answered before the awaits.
        runs: (request id, prompt ids, sampling) per engine request.

    Returns the generations and the `ExitStack` that owns them (the caller's `with` or the
    streaming response releases them). A refused admission or start releases those already started.
    """
    model = await resolve_again(state, tenant, body.model, body.adapters, first)
    generations: list[Generation] = []
    with ExitStack() as starting:
        for request_id, prompt_ids, sampling in runs:
            ticket = state.admission.acquire(tenant)
            generation = starting.enter_context(
                Generation(
                    state,
                    request_id=request_id,
                    tenant=tenant,
                    model=model,
                    prompt_ids=prompt_ids,
                    sampling=sampling,
                    ticket=ticket,
                )
            )
            generations.append(generation)
            generation.start()
        owned = starting.pop_all()
    return generations, owned

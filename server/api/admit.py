"""From a checked completion request to running generations: the steps chat and legacy share.

`check_request` refuses what neither route honours (fields by policy, `n` other than 1);
`resolve` maps the request's `model` to the base or the caller's adapter (404 otherwise) and is
called twice per request: before the expensive work (render, tokenize, grammar compile), and again
inside `start_generations` after those awaits, because the adapter may have been deleted or
re-uploaded meanwhile. From that second look to the `Generation`s (which count the adapter in use)
nothing awaits.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from server.api.errors import BadRequest
from server.api.request_fields import FieldPolicy, check_fields
from server.engine.types import SamplingParams
from server.generation import Generation
from server.state import ResolvedModel, ServerState


def check_request(body: Any, fields: dict[str, FieldPolicy]) -> None:
    """400 naming the first refused OpenAI field, then for `n` other than 1."""
    check_fields(body.model_dump(exclude_unset=True), fields)  # every OpenAI field honoured or refused by name
    if body.n not in (None, 1):
        raise BadRequest("only n=1 is supported", param="n")


def resolve(state: ServerState, tenant: str, body: Any) -> ResolvedModel:
    """The base or `tenant`'s adapter that `body.model` names; 404 for anything else."""
    return state.resolve_model(tenant, body.model)


def start_generations(
    state: ServerState, tenant: str, body: Any, runs: list[tuple[str, list[int], SamplingParams]]
) -> tuple[list[Generation], ExitStack]:
    """Resolve `body.model` once more, then admit and start one `Generation` per run.

    Args:
        runs: (request id, prompt ids, sampling) per engine request.

    Returns the generations and the `ExitStack` that owns them (the caller's `with` or the
    streaming response releases them). A refused admission or start releases those already started.
    """
    model = resolve(state, tenant, body)
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

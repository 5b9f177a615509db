"""A request's decoding controls -> `SamplingParams` keyword arguments.

Penalties, `min_p`, `logit_bias` (ids checked against the vocabulary) and the grammar that
`response_format` asks for. The grammar is compiled off the event loop through the app's
`GrammarCache` (per tenant, bounded, keyed by the schema's hash), within a time bound, so a huge
or pathological schema is a 400 for its sender and never a stall for anyone else.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.api.errors import BadRequest, RateLimited
from server.engine.grammar import GrammarCache, GrammarError, GrammarSpec
from server.engine.logits import parse_logit_bias

COMPILE_TIMEOUT_S = 20.0  # beyond this a schema is "too complex"; llguidance's own fuel limits bound the work
COMPILES_PER_TENANT = 2  # compiles in flight per tenant: one tenant cannot fill the worker threads


def grammar_spec(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """OpenAI's `response_format` -> what to constrain to (None: free text); 400 naming what is wrong."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind != "json_schema":
        raise BadRequest(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}"[:200],
            param="response_format.type",
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise BadRequest(
            "response_format.json_schema must be an object with name and schema", param="response_format.json_schema"
        )
    name = spec.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not all(c.isalnum() or c in "_-" for c in name):
        raise BadRequest(
            "response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
            param="response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise BadRequest(
            "response_format.json_schema.strict must be a boolean", param="response_format.json_schema.strict"
        )
    try:
        return GrammarSpec.json_schema(schema, strict=bool(strict))
    except GrammarError as exc:
        raise BadRequest(
            f"response_format.json_schema.schema: {exc}",
            param="response_format.json_schema.schema",
            code="invalid_schema",
        ) from None


def grammar_cache(state) -> GrammarCache:
    """The app's grammar cache, made on the first constrained request (the tokenizer is the engine's)."""
    if state.grammars is None:
        state.grammars = GrammarCache(state.tokenizer, state.template.end_of_turn_ids)
    return state.grammars


async def compile_grammar(state, tenant: str, spec: GrammarSpec | None, param: str = "response_format"):
    """The compiled grammar for `spec` (cached per tenant), compiled in a worker thread; 400 naming `param`."""
    if spec is None:
        return None
    cache = grammar_cache(state)
    cached = cache.get(tenant, spec)
    if cached is not None:
        return cached
    if cache.compiling[tenant] >= COMPILES_PER_TENANT:
        raise RateLimited(
            f"at most {COMPILES_PER_TENANT} schemas compile at once per API key; retry shortly",
            headers={"Retry-After": "1"},
        )
    cache.compiling[tenant] += 1  # counted until the thread really ends, even past the timeout
    work = asyncio.ensure_future(asyncio.to_thread(cache.compile, tenant, spec))
    work.add_done_callback(lambda _: cache.compiling.subtract([tenant]))
    try:
        compiled = await asyncio.wait_for(asyncio.shield(work), COMPILE_TIMEOUT_S)
    except TimeoutError:
        raise BadRequest(
            f"the schema took more than {COMPILE_TIMEOUT_S:.0f}s to compile; simplify it",
            param=param,
            code="invalid_schema",
        ) from None
    except GrammarError as exc:
        raise BadRequest(f"{param}: {exc}", param=param, code="invalid_schema") from None
    return compiled


async def decoding_controls(body, state, tenant: str, spec: GrammarSpec | None = None) -> dict[str, Any]:
    """The body's penalties, min_p, logit_bias and grammar as `SamplingParams` keyword arguments.

    Args:
        body: a chat (or legacy) completion request with the optional fields of `protocol.py`.
        state: the app's `ServerState` (tokenizer, template, grammar cache).
        tenant: whose cache the grammar goes in.
        spec: a grammar decided elsewhere (tool calls); otherwise `response_format`'s.
    """
    try:
        logit_bias = parse_logit_bias(body.logit_bias, len(state.tokenizer))
    except ValueError as exc:
        raise BadRequest(str(exc), param="logit_bias") from None
    param = "tools" if spec is not None else "response_format"
    if spec is None:
        spec = grammar_spec(getattr(body, "response_format", None))
    if spec is not None and (body.min_tokens or body.ignore_eos):
        raise BadRequest(
            "constrained output (response_format or tool calls) cannot be combined with min_tokens "
            "or ignore_eos: the grammar decides where the output ends",
            param="response_format",
        )
    return dict(
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        min_p=body.min_p or 0.0,
        logit_bias=logit_bias,
        grammar=await compile_grammar(state, tenant, spec, param),
    )

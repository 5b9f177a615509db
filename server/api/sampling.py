"""A completion request's sampling fields -> the engine's `SamplingParams`, for chat and legacy alike.

Both routes share OpenAI's field names (`temperature`, `top_p`, `stop`, `seed`, ...) and vLLM's
extensions (`top_k`, `min_tokens`, `ignore_eos`); they differ only in how logprobs are asked for
and which ids end the output, which the caller passes in. Out-of-range values are a 400.
"""

from __future__ import annotations

from typing import Any

from server.api.errors import BadRequest
from server.engine.types import SamplingParams


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """`stop` as a tuple of strings; 400 for an empty one (it would stop before the first token)."""
    strings = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not s for s in strings):
        raise BadRequest("stop strings must be non-empty", param="stop")
    return strings


def sampling_params(
    body: Any,
    max_tokens: int,
    *,
    logprobs: int | None,
    stop_token_ids: tuple[int, ...] | list[int] = (),
    controls: dict[str, Any],
) -> SamplingParams:
    """The engine's settings for one completion of `body` (400 naming the field when out of range).

    Args:
        body: a chat or legacy completion request.
        max_tokens: the completion budget after the prompt's length check.
        logprobs: how many top logprobs per token (0: only the chosen token's), None for none.
        stop_token_ids: ids that end the output besides EOS (chat: the template's end of turn).
        controls: `decoding.decoding_controls`' penalties, logit_bias and grammar.
    """
    stop = stop_strings(body.stop)
    if body.min_tokens > max_tokens:
        raise BadRequest(
            f"min_tokens ({body.min_tokens}) may not exceed the completion length ({max_tokens})", param="min_tokens"
        )
    try:
        # SamplingParams itself maps a tiny temperature to greedy and top_k -1 (vLLM's "off") to 0.
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k if body.top_k and body.top_k > 0 else 0,
            seed=body.seed,
            stop=stop,
            stop_token_ids=tuple(stop_token_ids),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            cache_salt=body.cache_salt,
            **controls,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None

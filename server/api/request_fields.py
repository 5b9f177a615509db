"""What this server does with every field of OpenAI's chat-completions request: one table.

Each of OpenAI's request fields is either *honoured* (it changes what the server does the way
OpenAI documents), a *hint* (an identifier or cache hint whose documented effect does not apply to
a self-hosted server: accepted, and listed as such in the README), or *refused*: a request that
sets it to anything but its "off" value gets a 400 naming the field and saying why. Nothing is
silently ignored. Fields that are not OpenAI's (vLLM's extensions, clients' extras) are not judged
here; `protocol.py` declares the extensions we honour.

The route calls `check_fields(body)` before it renders anything; `tests/server/test_request_fields.py`
walks the pinned `openai` package's own list of request fields against this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.api.errors import BadRequest

HONOURED, HINT, REFUSED = "honoured", "hint", "refused"


@dataclass(frozen=True)
class FieldPolicy:
    """`kind` is honoured / hint / refused; `why` is the README line or the 400's reason;
    for refused fields, `off(value)` says which values mean "not used" (those pass)."""

    kind: str
    why: str
    off: Callable[[Any], bool] = lambda value: value is None


def _falsy(value: Any) -> bool:
    return value is None or value is False


def _text_only(value: Any) -> bool:
    return value is None or value == ["text"]


def _default_tier(value: Any) -> bool:
    return value in (None, "auto", "default")


CHAT_FIELDS: dict[str, FieldPolicy] = {
    "messages": FieldPolicy(
        HONOURED, "rendered through the base's chat template; roles system, developer (as system), user, assistant"
    ),
    "model": FieldPolicy(HONOURED, "an adapter name in the caller's namespace, or the base"),
    "max_tokens": FieldPolicy(HONOURED, "completion length cap"),
    "max_completion_tokens": FieldPolicy(HONOURED, "completion length cap (wins over max_tokens)"),
    "temperature": FieldPolicy(HONOURED, "0..2; 0 is greedy"),
    "top_p": FieldPolicy(HONOURED, "nucleus sampling"),
    "n": FieldPolicy(HONOURED, "1..max_n choices (--limits.max_n), the prompt computed once; not with tool calls"),
    "stop": FieldPolicy(HONOURED, "stop strings, cut before the match"),
    "seed": FieldPolicy(HONOURED, "per-request generator: reproducible whatever shares the batch"),
    "stream": FieldPolicy(HONOURED, "server-sent events in OpenAI's chunk shape"),
    "stream_options": FieldPolicy(HONOURED, "include_usage"),
    "logprobs": FieldPolicy(HONOURED, "log-probabilities of the model's raw distribution"),
    "top_logprobs": FieldPolicy(HONOURED, "0..20 alternatives per token"),
    "presence_penalty": FieldPolicy(HONOURED, "OpenAI's definition, -2..2, over the completion's tokens"),
    "frequency_penalty": FieldPolicy(HONOURED, "OpenAI's definition, -2..2, over the completion's tokens"),
    "logit_bias": FieldPolicy(HONOURED, "token id -> -100..100 added to the logits (bounded count)"),
    "response_format": FieldPolicy(HONOURED, "text, json_object, json_schema (strict): constrained decoding"),
    "user": FieldPolicy(HINT, "an end-user identifier for OpenAI's abuse monitoring; accepted, not stored"),
    "safety_identifier": FieldPolicy(
        HINT, "an end-user identifier for OpenAI's abuse monitoring; accepted, not stored"
    ),
    "metadata": FieldPolicy(HINT, "tags for stored completions; nothing is stored (store is refused)"),
    "prompt_cache_key": FieldPolicy(HINT, "a cache-routing hint; the prefix cache is automatic (per tenant)"),
    "prompt_cache_retention": FieldPolicy(HINT, "a cache-retention hint; cached blocks are evicted LRU"),
    "service_tier": FieldPolicy(
        REFUSED, "this server has one service tier; only 'auto' or 'default'", off=_default_tier
    ),
    "store": FieldPolicy(REFUSED, "completions are not stored on this server", off=_falsy),
    "audio": FieldPolicy(REFUSED, "audio output is not supported: the models are text-only"),
    "modalities": FieldPolicy(REFUSED, "only the text modality is supported", off=_text_only),
    "prediction": FieldPolicy(REFUSED, "predicted outputs (speculative decoding) are not supported"),
    "web_search_options": FieldPolicy(REFUSED, "web search is not available on this server"),
    "reasoning_effort": FieldPolicy(REFUSED, "the served models are not reasoning models"),
    "verbosity": FieldPolicy(REFUSED, "the served models have no verbosity control"),
    "moderation": FieldPolicy(REFUSED, "moderation is not available on this server"),
    "prompt_cache_options": FieldPolicy(REFUSED, "the prefix cache is configured by the operator, not per request"),
    "tools": FieldPolicy(HONOURED, "function definitions (bounded); see tool_choice"),
    "tool_choice": FieldPolicy(
        HONOURED,
        "none; required or a named function: decoding constrained to a valid "
        "call; auto: 400 unless the base's template supports tools (the served ones do not)",
    ),
    "parallel_tool_calls": FieldPolicy(HONOURED, "with required: up to 8 calls, or exactly one when false"),
    "functions": FieldPolicy(
        REFUSED,
        "the deprecated functions API is not supported; use tools",
        off=lambda value: value is None or value == [],
    ),
    "function_call": FieldPolicy(
        REFUSED, "the deprecated functions API is not supported", off=lambda value: value in (None, "none")
    ),
    # loraswap's extension (not OpenAI's): a per-request weighted mix of the caller's adapters
    "adapters": FieldPolicy(
        HONOURED, "[{name, weight}]: a weighted mix of the caller's own adapters, with model = the base (server/mix.py)"
    ),
}


def check_fields(body: dict[str, Any], table: dict[str, FieldPolicy] = CHAT_FIELDS) -> None:
    """Raise a 400 naming the first refused field `body` sets to a value other than "off".

    Args:
        body: the request's fields as the client sent them (unset fields absent).
        table: the policy table (chat completions by default).
    """
    for name, policy in table.items():
        if policy.kind == REFUSED and name in body and not policy.off(body[name]):
            raise BadRequest(f"'{name}' is not supported: {policy.why}", param=name, code="unsupported_field")


# The legacy `POST /v1/completions` (openai's `completion_create_params`).
COMPLETION_FIELDS: dict[str, FieldPolicy] = {
    "model": CHAT_FIELDS["model"],
    "prompt": FieldPolicy(
        HONOURED,
        "a string or a list of strings (one choice each), tokenized as plain text; token-id prompts are refused",
    ),
    "max_tokens": FieldPolicy(HONOURED, "completion length cap (default 16, as OpenAI)"),
    "temperature": CHAT_FIELDS["temperature"],
    "top_p": CHAT_FIELDS["top_p"],
    "n": FieldPolicy(HONOURED, "1 only; other values are refused"),
    "stop": CHAT_FIELDS["stop"],
    "seed": CHAT_FIELDS["seed"],
    "stream": CHAT_FIELDS["stream"],
    "stream_options": CHAT_FIELDS["stream_options"],
    "logprobs": FieldPolicy(HONOURED, "0..5 alternatives per completion token, in the legacy shape"),
    "echo": FieldPolicy(HONOURED, "the prompt is prepended to the text (not with logprobs: no prompt logprobs)"),
    "presence_penalty": CHAT_FIELDS["presence_penalty"],
    "frequency_penalty": CHAT_FIELDS["frequency_penalty"],
    "logit_bias": CHAT_FIELDS["logit_bias"],
    "user": CHAT_FIELDS["user"],
    "best_of": FieldPolicy(REFUSED, "best_of is not supported (one sample per prompt)", off=lambda v: v in (None, 1)),
    "suffix": FieldPolicy(REFUSED, "insertion (suffix) is not supported by these models", off=lambda v: not v),
    "adapters": CHAT_FIELDS["adapters"],
}

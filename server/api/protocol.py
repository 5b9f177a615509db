"""Wire formats in OpenAI's shapes (and vLLM's `/tokenize`), as pydantic models.

Requests accept unknown fields (clients send more than we use) except those that would change
what the model sees in ways we refuse, which the routes check (`chat_template`). `messages` stay
plain dicts: the chat template is the one judge of their structure.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.limits import (
    MAX_MIX_COMPONENTS,
    MAX_MIX_NAME_CHARS,
    MAX_CACHE_SALT_CHARS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TOP_K,
    MAX_TOP_LOGPROBS,
    MIN_SEED,
)

# A stop string as the contract bounds it: 1..256 characters, at most 16 of them.
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class MixComponent(BaseModel):
    """One adapter of a request's `adapters` mix (a loraswap extension): the caller's adapter name
    and its weight (finite; the `--limits.max-mix-weight` bound is checked by server/mix.py)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_MIX_NAME_CHARS)
    weight: float = Field(default=1.0, allow_inf_nan=False)


class SamplingFields(BaseModel):
    """The fields chat and legacy completions share (OpenAI's, and vLLM's `top_k`, `min_p`,
    `repetition_penalty`, `min_tokens`, `ignore_eos`), each bounded at the edge."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # bounds and ids checked against the vocabulary
    # vLLM-compatible extensions
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=2)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    # vLLM's: only requests with the same salt share prefix-cache blocks
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)
    # loraswap's extension: a weighted mix of the caller's adapters (model = the base; server/mix.py)
    adapters: Annotated[list[MixComponent], Field(max_length=MAX_MIX_COMPONENTS)] | None = None


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions` body (OpenAI), with the shared sampling fields."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = 1
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM)
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    # Refused when set (a request may not bring its own template); declared so we can say so.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None  # parsed by server/api/decoding.py (request_fields.py: policies)


class TokenizeRequest(BaseModel):
    """`POST /tokenize` (vLLM): the same rendering path as chat completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    chat_template: str | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class PromptTokensDetails(BaseModel):
    """`cached_tokens`: prompt tokens whose KV came from the prefix cache; no audio input."""

    cached_tokens: int = 0
    audio_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    """Known exactly: no reasoning models, predictions are refused, no audio output."""

    reasoning_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    audio_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A tool call in a reply; in a stream delta `index` says which call a fragment extends."""

    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of `/v1/models`; `residency` / `folded` etc. are loraswap extensions."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    residency: str | None = None
    folded: bool | None = None
    pinned: bool | None = None
    version: int | None = None
    sha256: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterCard(BaseModel):
    """An adapter as the API shows it; `template` is the trained template's sha256 or "unknown"."""

    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    version: int
    sha256: str
    rank: int
    target_modules: list[str]
    template: str
    created_at: float | int | str | None = None
    residency: str | None = None
    folded: bool | None = None
    pinned: bool | None = None


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter.deleted"] = "adapter.deleted"
    name: str
    deleted: bool = True

"""Wire formats of the legacy `POST /v1/completions` (OpenAI), as pydantic models.

Like chat, unknown fields are accepted; OpenAI's own fields are judged by `request_fields.COMPLETION_FIELDS`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol import MixComponent, StreamOptions, Usage
from server.limits import MAX_MIX_COMPONENTS

MAX_PROMPTS = 16  # prompts in one request; each is a sequence with its own admission ticket


class CompletionRequest(BaseModel):
    """`POST /v1/completions` body, with vLLM's `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM-compatible extensions
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=2)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    # loraswap's extension: a weighted mix of the caller's adapters (model = the base; server/mix.py)
    adapters: Annotated[list[MixComponent], Field(max_length=MAX_MIX_COMPONENTS)] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy logprobs shape: parallel lists per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: Any = None

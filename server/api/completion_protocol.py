"""Wire formats of the legacy `POST /v1/completions` (OpenAI), as pydantic models.

Like chat, unknown fields are accepted; OpenAI's own fields are judged by `request_fields.COMPLETION_FIELDS`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.api.protocol import SamplingFields, Usage

MAX_PROMPTS = 16  # prompts in one request; each is a sequence with its own admission ticket


class CompletionRequest(SamplingFields):
    """`POST /v1/completions` body, with the shared sampling fields (protocol.SamplingFields)."""

    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    n: int | None = 1
    stream: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = False


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

"""The engine's contract with its callers: what goes in (a prompt, an adapter, sampling) and what comes out.

The HTTP layer builds these and never sees sequences, blocks or slots. The engine owns
everything behind `add_request` / `abort`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as the engine sees it: a unique id (one per stored version) and its directory.

    `id` is stable for the same content (the store's id); `path` holds `adapter_config.json` and
    `adapter_model.safetensors`, already validated against the base.
    """

    id: str
    path: Path


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names, vLLM-compatible extensions)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    # Logits processors (server/engine/logits.py checks their bounds)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: object = field(default=None, compare=False)  # a compiled grammar (server/engine/grammar.py)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in 0..max_tokens, got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        from server.engine.logits import check_bounds  # one place for the processors' bounds

        check_bounds(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class TokenEvent:
    """One step of a request's output stream.

    `text` is the newly decoded text (incremental detokenization; may be empty while a multi-byte
    character is incomplete, and is cut before a matched stop string). `finish_reason` is set on
    the last event: "stop" (end-of-turn / stop token / stop string), "length" (max_tokens or the
    model length), or "abort" (`error` says why when it was not the caller's abort, e.g. an adapter
    that failed to load).
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # set with finish_reason "abort" when the engine could not serve it

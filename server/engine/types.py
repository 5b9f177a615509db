"""The engine's contract with its callers: what goes in (a prompt, an adapter, sampling), what comes
out (token events, a stats snapshot) and the `EngineClient` protocol the server is typed against.

The HTTP layer builds and reads these and never sees sequences, blocks or slots. The engine owns
everything behind `add_request` / `abort`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


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


# -- what the engine reports (read by /v1/models, /v1/adapters and /metrics) --------------------

DISK = "disk"  # the tier of an adapter the engine does not hold: it is only in the store
TIERS = ("device", "host", "loading", "failed")  # the tiers the engine itself reports


@dataclass(frozen=True)
class AdapterResidency:
    """Where one adapter lives now: its tier and whether it is folded or pinned."""

    tier: str = DISK  # device | host | loading | failed | disk
    folded: bool = False
    pinned: bool = False


@dataclass(frozen=True)
class FoldView:
    """The fold state: the folded adapter (at most one), the pinned ones and the counters."""

    folded: str | None = None
    pinned: tuple[str, ...] = ()
    bytes: int = 0  # dense copies held for the folded adapter
    folds: int = 0
    unfolds: int = 0


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine, taken between steps; every field has a zero value.

    `adapters` maps adapter id -> tier ("device" | "host" | "loading" | "failed"); an adapter it
    does not name is only on disk. `slots` maps each adapter slot (1..max_loras; slot 0 is the
    base) to the adapter id it holds, or None.
    """

    waiting: int = 0
    running: int = 0
    adapters: Mapping[str, str] = field(default_factory=dict)
    slots: Mapping[int, str | None] = field(default_factory=dict)
    fold: FoldView = FoldView()
    slot_loads: int = 0  # host -> slot writes (monotonic)
    slot_evictions: int = 0  # slots overwritten while holding another adapter (monotonic)
    disk_loads: int = 0
    adapter_load_errors: int = 0
    preemptions: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    steps: int = 0
    generated_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    def residency(self) -> dict[str, AdapterResidency]:
        """adapter id -> AdapterResidency for every adapter the engine holds, folds or pins."""
        pinned = set(self.fold.pinned)
        folded = self.fold.folded
        ids = set(self.adapters) | pinned | ({folded} if folded else set())
        return {aid: AdapterResidency(self.adapters.get(aid, DISK), aid == folded, aid in pinned) for aid in ids}


# -- the contract ----------------------------------------------------------------------------


@runtime_checkable
class EngineClient(Protocol):
    """What the server needs of an engine: `Engine`, the tests' `FakeEngine` and, later, a remote
    replica all satisfy it (tests/server/test_engine_contract.py compares their signatures).

    `add_request` raises the engine's typed errors (`PromptTooLong`, `EngineStopped`, ...) at once;
    closing the returned iterator early aborts the request. `abort`, `pin`, `unpin` and
    `forget_adapter` are commands applied between steps, safe from any thread.

    Per-tenant state is keyed by (tenant, content id) (issue 9): `add_request` carries the tenant,
    `pin`/`unpin` pin for one tenant and never remove another's pin, and `tenant_residency`
    shows only the adapters that tenant used or pinned, with `pinned` meaning its own pin.
    """

    tokenizer: Any  # a Hugging Face tokenizer (the server renders and counts with it)
    max_model_len: int  # prompt + completion tokens the engine's model supports

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: AdapterRef | None,
        sampling: SamplingParams,
        tenant: str = "default",
    ) -> AsyncIterator[TokenEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def pin(self, adapter: AdapterRef, tenant: str = "default") -> None: ...

    def unpin(self, adapter_id: str, tenant: str = "default") -> None: ...

    def forget_adapter(self, adapter_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def tenant_residency(self, tenant: str) -> dict[str, AdapterResidency]: ...

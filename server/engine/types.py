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
class MixRef(AdapterRef):
    """A per-request weighted mix of adapters, served as one adapter (adapters/mix.py).

    `id` is the mix's content id ("mix:<sha256>" over its parts); `parts` are the components and
    their weights in canonical order. A mix has no directory (`path` is empty): the slots' reader
    composes it from its parts' directories (server/engine/mixes.py).
    """

    parts: tuple[tuple[AdapterRef, float], ...] = ()


GREEDY_BELOW = 1e-5  # vLLM's rule: a smaller temperature is greedy (no division by tiny numbers)
MAX_TOP_K = 2**31 - 1
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_TOP_LOGPROBS = 20
MAX_STOPS, MAX_STOP_CHARS = 16, 256
MAX_STOP_TOKEN_IDS = 256
MAX_CACHE_SALT_CHARS = 256  # server/limits.py holds the edge's copy


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI names, vLLM-compatible extensions).

    The issue-9 bounds are checked here as a second line behind the HTTP edge (ValueError naming
    the field), and values are normalised so the sampler never meets a hostile number:
    temperature < 1e-5 becomes 0 (greedy), top_k -1 becomes 0 (off; the sampler clamps it to the
    vocabulary), and seed becomes `seed % 2**64` (what `torch.Generator.manual_seed` accepts).
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) means off
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
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache blocks

    def __post_init__(self):
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        temperature = _check_float("temperature", self.temperature, 0.0, 2.0)
        top_p = _check_float("top_p", self.top_p, 0.0, 1.0)
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, -1, MAX_TOP_K)
        if self.seed is not None:
            _check_int("seed", self.seed, *SEED_RANGE)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        stop = tuple(self.stop)
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stop):
            raise ValueError(f"stop must be at most {MAX_STOPS} strings of 1..{MAX_STOP_CHARS} characters")
        ids = tuple(self.stop_token_ids)
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        for t in ids:
            _check_int("stop_token_ids", t, 0, MAX_TOP_K)
        if self.cache_salt is not None and not (
            isinstance(self.cache_salt, str) and 1 <= len(self.cache_salt) <= MAX_CACHE_SALT_CHARS
        ):
            raise ValueError(f"cache_salt must be a string of 1..{MAX_CACHE_SALT_CHARS} characters")
        # normalise (frozen dataclass: set through object.__setattr__)
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_BELOW else temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "top_k", max(self.top_k, 0))
        if self.seed is not None:
            object.__setattr__(self, "seed", self.seed % 2**64)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)
        from server.engine.logits import check_bounds  # one place for the processors' bounds

        check_bounds(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_int(name: str, value, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {'inf' if high is None else high}], got {value}")


def _check_float(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return float(value)


@dataclass
class TokenEvent:
    """One step of a request's output stream.

    `text` is the newly decoded text (incremental detokenization; may be empty while a multi-byte
    character is incomplete, and is cut before a matched stop string). `finish_reason` is set on
    the last event: "stop" (end-of-turn / stop token / stop string), "length" (max_tokens or the
    model length), or "abort" (`error` says why when it was not the caller's abort, e.g. an adapter
    that failed to load). An engine-side failure that ends only this sequence also sets
    `error_code` ("non_finite_output", "adapter_load_failed", "engine_error") and `error_status`,
    the HTTP status the API should answer with (422, 503, 500).
    """

    request_id: str
    token_id: int | None
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    error: str | None = None  # set with finish_reason "abort" when the engine could not serve it
    error_code: str | None = None
    error_status: int | None = None


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
    adapter_load_timeouts: int = 0  # loads that ran past adapter_load_timeout_s (monotonic)
    host_cache_bytes: int = 0  # bytes the host adapter cache holds now
    preemptions: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    steps: int = 0
    generated_tokens: int = 0
    kv_blocks_cached: int = 0  # blocks registered in the prefix cache (held or evictable)
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (monotonic)
    prefix_cache_hits: int = 0  # of those, found there (monotonic)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

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

    def forget_adapter(self, adapter_id: str, tenant: str | None = None) -> None: ...

    def stats(self) -> EngineStats: ...

    def tenant_residency(self, tenant: str) -> dict[str, AdapterResidency]: ...

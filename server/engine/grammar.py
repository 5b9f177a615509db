"""Structured outputs: JSON schemas compiled by llguidance into per-step token masks.

- `GrammarSpec`: what a request constrains to (a JSON schema, or any JSON object), canonical JSON
  and its sha256; size-bounded.
- `GrammarCache`: compiles specs against the base's tokenizer and keeps the results per tenant
  (bounded LRU, keyed by tenant + schema hash: one tenant's schemas never warm or evict another's).
- `CompiledGrammar.matcher()`: a fresh per-sequence `GrammarMatcher` (a deep copy of a prototype,
  so the compile is paid once per schema, not per request).

Why llguidance (see bench/grammar_choice.py and the README): on this CPU with SmolLM2's 49k vocabulary
it compiles a realistic schema in 1-3 ms (xgrammar 9-16 ms, outlines-core 175-256 ms) with masks of
25-40 us median CPU time per step, it has no dependencies (xgrammar 0.2.8 pulls triton), and its
lexer and parser run on fuel limits, so a hostile schema cannot stall a step for the batch.
The output is compact JSON (no free whitespace): a weak model cannot wander in blank space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from adapters.errors import LoraswapError

if TYPE_CHECKING:  # the stub's TypedDict; not importable at run time
    from llguidance._lib import JsonCompileOptions

MAX_SCHEMA_BYTES = 32 * 1024
log = logging.getLogger(__name__)
CACHE_PER_TENANT = 32
_COMPILE_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}


class GrammarError(LoraswapError):
    """The schema is invalid, uses an unsupported feature, or is too large (-> 400). The API
    re-raises it as a `BadRequest` naming the field that carried the schema."""

    status, code = 400, "invalid_schema"


@dataclass(frozen=True)
class GrammarSpec:
    """A JSON schema as canonical text; `key` is its sha256 (the cache key within a tenant)."""

    schema: str
    key: str

    @classmethod
    def json_schema(cls, schema, strict: bool = False) -> "GrammarSpec":
        """Args: schema: a JSON-schema object; strict: OpenAI's flag (the schema is enforced either way)."""
        if not isinstance(schema, dict):
            raise GrammarError("the schema must be a JSON object")
        try:
            text = json.dumps(schema, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise GrammarError(f"the schema is not plain JSON: {exc}") from None
        if len(text.encode()) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
        return cls(text, hashlib.sha256(text.encode()).hexdigest())

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls.json_schema({"type": "object"})


class GrammarMatcher:
    """One sequence's position in its grammar: `allowed(vocab)` for the next step, `accept(token)` after."""

    def __init__(self, matcher, end_ids: list[int]):
        self._matcher = matcher
        self._end_ids = end_ids
        self._pending: Future | None = None  # the next mask, being computed while the model runs

    def prefetch(self, pool: Executor) -> None:
        """Start computing the next mask on `pool` (llguidance releases the GIL, as does the forward)."""
        if self._pending is None and not self._matcher.is_error():
            self._pending = pool.submit(self._matcher.compute_logit_bias)

    def allowed(self, vocab: int) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar permits next (end-of-turn once the value is complete)."""
        out = torch.zeros(vocab, dtype=torch.bool)
        pending, self._pending = self._pending, None
        try:
            # The prefetched mask first: the matcher must not be touched while a worker computes on it.
            bias = pending.result() if pending is not None else None  # one byte per token: 0 or 200
            if not self._matcher.is_error():
                if bias is None:
                    bias = self._matcher.compute_logit_bias()
                mask = torch.frombuffer(bytearray(bias), dtype=torch.uint8).bool()
                n = min(vocab, mask.numel())
                out[:n] = mask[:n]
        except Exception:  # noqa: BLE001 - a matcher failure ends this sequence, never the batch
            log.exception("grammar mask failed; ending the sequence")
            out.zero_()
        if not out.any():
            # Only after a matcher error (fuel exhausted): end the turn rather than sample from nothing.
            out[[i for i in self._end_ids if i < vocab]] = True
        return out

    def accept(self, token_id: int) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.exception()  # wait: never advance the matcher under a running mask computation
        if not self._matcher.is_stopped():
            self._matcher.consume_token(token_id)  # a refused token puts the matcher in its error state


class CompiledGrammar:
    """A schema compiled for the base's tokenizer; `matcher()` is cheap (a copy of the prototype)."""

    def __init__(self, spec: GrammarSpec, prototype, end_ids: list[int]):
        self.spec = spec
        self._prototype = prototype
        self._end_ids = end_ids
        self._lock = threading.Lock()

    @property
    def end_ids(self) -> list[int]:
        return list(self._end_ids)

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._prototype.deep_copy(), self._end_ids)


class GrammarCache:
    """Compiled grammars per tenant, each tenant's bounded (LRU). Thread-safe.

    Args:
        tokenizer: the base's Hugging Face tokenizer (fast).
        end_ids: the template's end-of-turn ids: what the grammar allows once the value is complete.
        per_tenant: how many compiled grammars each tenant keeps.
    """

    def __init__(self, tokenizer, end_ids: list[int], per_tenant: int = CACHE_PER_TENANT):
        self.tokenizer = tokenizer
        self.end_ids = list(end_ids)
        self.per_tenant = per_tenant
        self._lltok: Any = None  # llguidance.LLTokenizer, built on first use
        self._lock = threading.Lock()  # the entries; held only briefly (get() runs on the event loop)
        self._tokenizer_lock = threading.Lock()  # building the llguidance tokenizer takes ~1 s
        self._entries: dict[str, OrderedDict[str, CompiledGrammar]] = {}
        self.compiles = 0
        self.compiling: Counter[str] = Counter()  # tenant -> compiles in flight (kept by the API, on its loop)

    def get(self, tenant: str, spec: GrammarSpec) -> CompiledGrammar | None:
        with self._lock:
            entries = self._entries.get(tenant)
            if entries is None or spec.key not in entries:
                return None
            entries.move_to_end(spec.key)
            return entries[spec.key]

    def compile(self, tenant: str, spec: GrammarSpec) -> CompiledGrammar:
        """Compile `spec` (or return the tenant's cached copy); raises GrammarError naming the problem."""
        import llguidance

        cached = self.get(tenant, spec)
        if cached is not None:
            return cached
        lltok = self._tokenizer()
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.schema, defaults=_COMPILE_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        limits = llguidance.LLParserLimits(verbose_errors=False)  # errors must not echo parser internals
        matcher = llguidance.LLMatcher(lltok, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise GrammarError(_short(matcher.get_error()))
        compiled = CompiledGrammar(spec, matcher, self.end_ids)
        with self._lock:
            self.compiles += 1
            entries = self._entries.setdefault(tenant, OrderedDict())
            entries[spec.key] = compiled
            while len(entries) > self.per_tenant:
                entries.popitem(last=False)
        return compiled

    def _tokenizer(self):
        import llguidance.hf

        with self._tokenizer_lock:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, eos_token=self.end_ids or None)
            return self._lltok


def _short(message: str) -> str:
    return message.strip().splitlines()[0][:300] if message.strip() else "the schema could not be compiled"

"""A sequence: one request's state inside the engine (tokens, KV blocks, slot, progress).

The scheduler moves sequences between WAITING, RUNNING and FINISHED; the block manager fills
`block_table`; the adapter slots fill `slot`. A sequence holds no tensors: text and stop strings
are delegated to an optional `TextTracker` (see detokenizer.py), so scheduling is testable
without a tokenizer or a model.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.engine.types import AdapterRef, SamplingParams

if TYPE_CHECKING:  # the sampler's type only; this module holds no tensors
    import torch

NO_SLOT = -1  # not holding a slot pin (waiting, preempted, finished)
_ids = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TextTracker(Protocol):
    """Turns appended tokens into text; reports a matched stop string."""

    def append(self, token_id: int) -> tuple[str, bool]:
        """Returns (new text to emit, whether a stop string matched)."""

    def flush(self) -> str:
        """Text held back (a possible stop-string prefix) once the sequence ends."""


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    adapter: AdapterRef | None = None
    eos_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    text: TextTracker | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V sit in the cache
    slot: int = NO_SLOT
    finish_reason: str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # the sampler's per-request torch.Generator (seeded requests)
    tenant: str = "default"  # whose request: fair slot share and per-tenant state key on it
    grammar_state: object = None  # the grammar matcher of a constrained request (engine/logits.py)
    # Prefix cache (prefix_cache.py, block_manager.py). None: this sequence neither hits nor registers.
    cache_key: bytes | None = None
    weights: str = "lora"  # the weights its KV is computed under since admission (LORA or FOLDED)
    block_hashes: list[bytes] = field(default_factory=list)  # identities of its full blocks so far
    num_registered: int = 0  # leading blocks of block_table that are in the cache index
    cache_limit: int = 1 << 62  # positions from here on were computed under other weights: never shared
    num_cached_tokens: int | None = None  # prompt tokens found in the cache at first admission
    tail_registered: bool = False  # its prompt's last block is indexed for copies (block_manager)
    cache_lookup: bool = True  # False after a fold change met its cached blocks (scheduler.ran_under)

    @property
    def adapter_id(self) -> str | None:
        return self.adapter.id if self.adapter is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole list."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def below_min_tokens(self) -> bool:
        """While true the sampler masks stop tokens (min_tokens)."""
        return len(self.output_ids) < self.sampling.min_tokens

    def min_tokens_mask_ids(self) -> set[int]:
        """Token ids masked while below min_tokens: the stop tokens and EOS, even with ignore_eos
        (vLLM's semantics: ignore_eos only stops EOS from ending the sequence later)."""
        return set(self.sampling.stop_token_ids) | self.eos_ids

    def stop_token_ids(self) -> set[int]:
        ids = set(self.sampling.stop_token_ids)
        if not self.sampling.ignore_eos:
            ids |= self.eos_ids
        return ids

    def append_token(self, token_id: int) -> tuple[str, str | None]:
        """Record a sampled token; returns (new text, finish reason or None)."""
        self.output_ids.append(token_id)
        n_out = len(self.output_ids)
        # The sampler masks stop tokens while below min_tokens; this guards the same rule.
        is_stop_token = token_id in self.stop_token_ids() and n_out > self.sampling.min_tokens
        text, stop_string = ("", False)
        if self.text is not None and not is_stop_token:
            text, stop_string = self.text.append(token_id)
        if is_stop_token or stop_string:
            reason = "stop"
        elif n_out >= self.sampling.max_tokens or self.num_tokens >= self.max_model_len:
            reason = "length"
        else:
            reason = None
        if reason is not None and self.text is not None and not stop_string:
            text += self.text.flush()
        return text, reason

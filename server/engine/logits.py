"""Per-sequence logits processors, applied to a whole batch of last-position logits before sampling.

In order, each only on the rows that asked for it:

- `repetition_penalty` r (vLLM's / Hugging Face's definition): for every token already in the prompt
  or the completion, a positive logit is divided by r and a negative one multiplied by r.
- `frequency_penalty` a_f and `presence_penalty` a_p (OpenAI's definition, -2..2), over the
  completion's tokens: `logit[j] -= c[j] * a_f + (c[j] > 0) * a_p`, c[j] = count of token j so far.
- `logit_bias` (OpenAI): a per-token value in -100..100 added to the logit.
- the grammar mask (structured outputs): tokens the sequence's grammar forbids get -inf.
- `min_p` (vLLM's): tokens whose probability *at the request's temperature* is below
  `min_p * max probability` get -inf; in logit space `logit < max + T * log(min_p)`.

`process` returns new logits (the raw ones stay untouched for logprobs); `accept` advances each
sequence's grammar matcher by its sampled token; `prefetch` starts the next masks in worker threads
before the forward, so they are computed while the model runs. Nothing here knows about scheduling or HTTP.
"""

from __future__ import annotations

import math

import torch

MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's documented bound on logit_bias entries


def check_bounds(sampling) -> None:
    """Raise ValueError naming the field when a processor setting is out of range."""
    if not -2 <= sampling.presence_penalty <= 2:
        raise ValueError(f"presence_penalty must be in -2..2, got {sampling.presence_penalty}")
    if not -2 <= sampling.frequency_penalty <= 2:
        raise ValueError(f"frequency_penalty must be in -2..2, got {sampling.frequency_penalty}")
    if not 0.01 <= sampling.repetition_penalty <= 2:
        raise ValueError(f"repetition_penalty must be in 0.01..2, got {sampling.repetition_penalty}")
    if not 0 <= sampling.min_p <= 1:
        raise ValueError(f"min_p must be in 0..1, got {sampling.min_p}")
    if len(sampling.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens")
    for token_id, bias in sampling.logit_bias:
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias[{token_id}] must be in -100..100, got {bias}")


def parse_logit_bias(raw: dict | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}` -> sorted ((id, bias), ...); ValueError naming a bad key or value.

    Args:
        raw: the request's mapping (keys are decimal token ids as strings).
        vocab_size: ids must be below this (the tokenizer's vocabulary).
    """
    if not raw:
        return ()
    if len(raw) > MAX_LOGIT_BIAS_TOKENS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(raw)}")
    out = {}
    for key, bias in raw.items():
        if not (isinstance(key, str) and key.isdecimal() and len(key) <= 10):
            raise ValueError(f"logit_bias key {key[:20]!r} is not a token id")
        if int(key) >= vocab_size:
            raise ValueError(f"logit_bias key {key} is not in the vocabulary (size {vocab_size})")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise ValueError(f"logit_bias[{key}] must be a number in -100..100")
        out[int(key)] = float(bias)
    return tuple(sorted(out.items()))


def _active(seq) -> bool:
    s = seq.sampling
    return bool(
        s.presence_penalty
        or s.frequency_penalty
        or s.repetition_penalty != 1.0
        or s.min_p
        or s.logit_bias
        or s.grammar is not None
    )


def process(logits: torch.Tensor, seqs: list) -> torch.Tensor:
    """logits (S, vocab) float32 on the CPU, one row per sequence -> processed copy (or `logits`)."""
    rows = [i for i, seq in enumerate(seqs) if _active(seq)]
    if not rows:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i in rows:
        seq, s = seqs[i], seqs[i].sampling
        row = logits[i]  # (vocab,) a view: edits land in `logits`
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[torch.tensor(seq.prompt_ids + seq.output_ids, dtype=torch.long)] = True
            penalised = torch.where(row > 0, row / s.repetition_penalty, row * s.repetition_penalty)
            row.copy_(torch.where(seen, penalised, row))
        if (s.presence_penalty or s.frequency_penalty) and seq.output_ids:
            counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.long), minlength=vocab)[:vocab]
            row -= counts.to(row.dtype) * s.frequency_penalty + (counts > 0).to(row.dtype) * s.presence_penalty
        if s.logit_bias:
            ids, values = zip(*s.logit_bias)
            row.index_add_(0, torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=row.dtype))
        if s.grammar is not None:
            allowed = matcher(seq).allowed(vocab)  # (vocab,) bool
            row.masked_fill_(~allowed, float("-inf"))
        if s.min_p and s.temperature > 0:
            cut = row.max() + s.temperature * math.log(s.min_p)
            row.masked_fill_(row < cut, float("-inf"))
    return logits


def matcher(seq):
    """The sequence's grammar matcher, made on first use (it lives as long as the sequence)."""
    if seq.grammar_state is None:
        seq.grammar_state = seq.sampling.grammar.matcher()
    return seq.grammar_state


def prefetch(seqs: list, pool) -> None:
    """Start the constrained sequences' next masks on `pool`, to overlap them with the model's forward."""
    for seq in seqs:
        if seq.sampling.grammar is not None:
            matcher(seq).prefetch(pool)


def accept(seqs: list, token_ids: list[int]) -> None:
    """Advance each constrained sequence's matcher by the token it just sampled."""
    for seq, token_id in zip(seqs, token_ids):
        if seq.sampling.grammar is not None:
            matcher(seq).accept(token_id)

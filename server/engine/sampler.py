"""Turn the step's last-position logits into tokens: greedy, temperature, top-k, top-p, seeds.

Greedy rows are one batched argmax. Rows that sample are filtered in a batch (temperature,
top-k, top-p), then draw with their own `torch.Generator` when the request gave a seed, so a
seeded request reproduces whatever else shares its batch. While a sequence is below
`min_tokens` its stop tokens and EOS are masked. Log-probabilities are those of the model's raw
distribution (before temperature and filtering), as OpenAI reports them.

Each row's trouble stays in its row: a row whose logits are not finite gets a `SampledToken`
carrying `non_finite_output` (422) instead of a token, and a draw that raises ends only its row
with `engine_error` (500). Nothing a sequence brings can make `sample` raise for the batch.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.engine import fused
from server.engine import logits as logits_processors
from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)

NON_FINITE = ("non_finite_output", 422, "the model produced non-finite values for this request (its adapter or prompt)")
ENGINE_ERROR = ("engine_error", 500, "internal engine error")


@dataclass
class SampledToken:
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error_code: str | None = None  # set instead of a token when this row cannot continue
    error_status: int | None = None
    error: str | None = None

    @classmethod
    def failed(cls, kind: tuple[str, int, str]) -> SampledToken:
        return cls(None, error_code=kind[0], error_status=kind[1], error=kind[2])


class Sampler:
    def __init__(self, seed: int | None = None):
        self._shared = torch.Generator()
        self._shared.manual_seed(seed if seed is not None else torch.seed())
        self._masks = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-mask")

    def prefetch(self, seqs: list[Sequence]) -> None:
        """Before the forward: start the grammar masks of the sequences about to sample."""
        logits_processors.prefetch(seqs, self._masks)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """logits (S, vocab) float32 on any device; one row per sequence."""
        logits = logits.cpu()
        raw = logits
        vocab = logits.shape[-1]
        # The finiteness check of the model's own output and the greedy argmax in one pass
        # (fused.py); the argmax is redone below only for rows whose logits get processed.
        raw_argmax, finite = fused.argmax_finite(raw)  # (S,) each
        processed = logits_processors.process(logits, seqs)  # penalties, logit_bias, grammar, min_p
        masked: dict[int, list[int]] = {}  # rows below min_tokens: their stop tokens and EOS
        for i, s in enumerate(seqs):
            if s.below_min_tokens and (ids := sorted(t for t in s.min_tokens_mask_ids() if t < vocab)):
                masked[i] = ids
        # greedy for everyone; sampled rows overwrite
        if processed is raw:
            # Only min_tokens masks change anything, and a row's first maximum moves only if they
            # hide it: that row alone is redone (no copy of the whole batch's logits).
            tokens = list(raw_argmax)
            for i, ids in masked.items():
                if tokens[i] in ids:
                    row = raw[i].clone()
                    row[ids] = float("-inf")
                    tokens[i] = int(row.argmax())
        else:
            for i, ids in masked.items():  # processed is process()'s own copy
                processed[i, ids] = float("-inf")
            tokens = processed.argmax(dim=-1).tolist()
        failed: dict[int, tuple[str, int, str]] = {i: NON_FINITE for i, ok in enumerate(finite) if not ok}
        rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy and i not in failed]
        if rows:
            chosen = processed[rows]  # a copy
            if processed is raw:
                for j, i in enumerate(rows):
                    if i in masked:
                        chosen[j, masked[i]] = float("-inf")
            probs = self._filtered_probs(chosen, [seqs[i] for i in rows])
            for j, i in enumerate(rows):
                try:
                    tokens[i] = int(torch.multinomial(probs[j], 1, generator=self._generator(seqs[i]))[0])
                except Exception:  # noqa: BLE001 - one row's draw must not end the batch
                    logger.exception("sampling failed for request %s", seqs[i].request_id)
                    failed[i] = ENGINE_ERROR
        out = [SampledToken.failed(failed[i]) if i in failed else SampledToken(t) for i, t in enumerate(tokens)]
        ok = [i for i in range(len(seqs)) if i not in failed]
        logits_processors.accept([seqs[i] for i in ok], [tokens[i] for i in ok])
        wants = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None and i not in failed]
        if wants:
            logprobs = torch.log_softmax(raw[wants], dim=-1)
            for j, i in enumerate(wants):
                out[i].logprob = float(logprobs[j, out[i].token_id])
                k = min(seqs[i].sampling.logprobs, vocab)
                if k:
                    values, ids = logprobs[j].topk(k)
                    out[i].top_logprobs = list(zip(ids.tolist(), values.tolist()))
        return out

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(R, vocab) probabilities after temperature, top-k and top-p (rows have finite logits)."""
        temps = torch.tensor([s.sampling.temperature for s in seqs], dtype=logits.dtype)
        # Shift by the row max first: the largest becomes 0, so dividing by a small temperature
        # cannot overflow to inf (softmax is shift-invariant).
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temps[:, None]
        vocab = logits.shape[-1]
        top_k = [s.sampling.top_k if 0 < s.sampling.top_k < vocab else vocab for s in seqs]
        top_p = [s.sampling.top_p for s in seqs]
        if any(k < vocab for k in top_k) or any(p < 1 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
            drop = torch.arange(vocab)[None, :] >= torch.tensor(top_k)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the top one always stays)
            before = probs.cumsum(dim=-1) - probs
            drop = before >= torch.tensor(top_p, dtype=probs.dtype)[:, None]
            drop[:, 0] = False  # a top_p that rounds to 0 in this dtype (e.g. 5e-324) must not drop everything
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return logits.softmax(dim=-1)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.sampling.seed is None:
            return self._shared
        if seq.generator is None:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(seq.sampling.seed % 2**64)
        return seq.generator

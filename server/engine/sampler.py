"""Turn the step's last-position logits into tokens: greedy, temperature, top-k, top-p, seeds.

Greedy rows are one batched argmax. Rows that sample are filtered in a batch (temperature,
top-k, top-p), then draw with their own `torch.Generator` when the request gave a seed, so a
seeded request reproduces whatever else shares its batch. While a sequence is below
`min_tokens` its stop tokens are masked. Log-probabilities are those of the model's raw
distribution (before temperature and filtering), as OpenAI reports them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.engine import logits as logits_processors
from server.engine.sequence import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


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
        logits = logits_processors.process(logits, seqs)  # penalties, logit_bias, grammar, min_p
        masked = [i for i, s in enumerate(seqs) if s.below_min_tokens and s.stop_token_ids()]
        if masked:
            logits = logits.clone()
            for i in masked:
                logits[i, sorted(seqs[i].stop_token_ids())] = float("-inf")
        tokens = logits.argmax(dim=-1)  # (S,) greedy for everyone; sampled rows overwrite
        rows = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
        if rows:
            probs = self._filtered_probs(logits[rows], [seqs[i] for i in rows])
            for j, i in enumerate(rows):
                tokens[i] = torch.multinomial(probs[j], 1, generator=self._generator(seqs[i]))[0]
        out = [SampledToken(int(t)) for t in tokens.tolist()]
        logits_processors.accept(seqs, [o.token_id for o in out])
        wants = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
        if wants:
            logprobs = torch.log_softmax(raw[wants], dim=-1)
            for j, i in enumerate(wants):
                out[i].logprob = float(logprobs[j, out[i].token_id])
                k = seqs[i].sampling.logprobs
                if k:
                    values, ids = logprobs[j].topk(k)
                    out[i].top_logprobs = list(zip(ids.tolist(), values.tolist()))
        return out

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """(R, vocab) probabilities after temperature, top-k and top-p."""
        temps = torch.tensor([s.sampling.temperature for s in seqs], dtype=logits.dtype)
        logits = logits / temps[:, None]
        top_k = [s.sampling.top_k for s in seqs]
        top_p = [s.sampling.top_p for s in seqs]
        if any(k > 0 for k in top_k) or any(p < 1 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (R, V)
            vocab = logits.shape[-1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_k])
            drop = torch.arange(vocab)[None, :] >= ks[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the mass before it already reaches top_p (the top one always stays)
            before = probs.cumsum(dim=-1) - probs
            drop = before >= torch.tensor(top_p, dtype=probs.dtype)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return logits.softmax(dim=-1)

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.sampling.seed is None:
            return self._shared
        if seq.generator is None:
            seq.generator = torch.Generator()
            seq.generator.manual_seed(seq.sampling.seed)
        return seq.generator

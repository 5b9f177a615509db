"""The SFT objective on a packed micro-batch: next-token cross-entropy on supervised positions only.

The decoder runs once over the packed rows (block-diagonal mask, per-example positions); only
the hidden states that predict a supervised token are projected onto the vocabulary, so the
lm_head's work and the (tokens x vocab) logits scale with the assistant tokens rather than
with every token in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.batching import PackedBatch


def token_losses(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Per-target negative log-likelihoods, shape (num_targets,), in float32.

    Args:
        model: a HF `*ForCausalLM` (its decoder and lm_head are called directly).
        batch: a packed micro-batch already on the model's device.
    """
    mask = batch.attention_mask()  # (rows, 1, L, L) bool
    hidden = model.get_decoder()(
        input_ids=batch.input_ids,
        attention_mask=mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (rows, L, hidden)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)  # (N, hidden)
    logits = model.get_output_embeddings()(picked).float()  # (N, vocab)
    return F.cross_entropy(logits, batch.targets, reduction="none")


def example_losses(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Mean loss of each example in the batch, shape (num_examples,)."""
    losses = token_losses(model, batch)
    sums = torch.zeros(batch.num_examples, dtype=losses.dtype, device=losses.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, batch.target_owner, losses)
    counts.index_add_(0, batch.target_owner, torch.ones_like(losses))
    return sums / counts

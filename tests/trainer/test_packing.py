"""Packing: per-example losses from one packed forward equal separate unpacked forwards."""

from __future__ import annotations

import random

import pytest
import torch

from trainer.batching import choose_layout, first_fit_decreasing, micro_batches, pack
from trainer.data import Example
from trainer.loss import example_losses


def _random_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for line in range(n):
        length = rng.randint(5, 40)
        ids = tuple(rng.randrange(3, vocab) for _ in range(length))
        prompt = rng.randint(1, length - 2)  # the last tokens are the "assistant" span
        mask = tuple(t >= prompt for t in range(length))
        examples.append(Example(ids=ids, mask=mask, line=line + 1))
    return examples


def _reference_loss(model, example: Example) -> torch.Tensor:
    """Plain HF forward of one example alone, loss on its supervised next tokens."""
    ids = torch.tensor([example.ids])
    logits = model(input_ids=ids).logits[0, :-1].float()  # (L-1, vocab) predicting ids[1:]
    labels = torch.tensor(example.ids[1:])
    keep = torch.tensor(example.mask[1:])
    return torch.nn.functional.cross_entropy(logits[keep], labels[keep])


@pytest.fixture(scope="module")
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(tiny_base_dir), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


@pytest.mark.parametrize("token_cost", [1e9, 0.0, 100.0])
def test_packed_losses_equal_separate_forwards(tiny_model, token_cost):
    # token_cost 1e9 favours one long row (many examples share a row), 0 favours one row each.
    examples = _random_examples(7, tiny_model.config.vocab_size)
    batch = pack(examples, token_cost=token_cost)
    if token_cost == 1e9:
        assert batch.input_ids.shape[0] < len(examples), "examples should share rows"
    with torch.no_grad():
        packed = example_losses(tiny_model, batch)
        separate = torch.stack([_reference_loss(tiny_model, e) for e in examples])
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_packing_keeps_every_token_and_position():
    examples = _random_examples(9, 300, seed=1)
    batch = pack(examples, token_cost=50.0)
    assert batch.num_tokens == sum(len(e) for e in examples)
    assert batch.num_targets == sum(e.num_targets for e in examples)
    for i, example in enumerate(examples):
        where = batch.segment_ids == i
        assert batch.input_ids[where].tolist() == list(example.ids)
        assert batch.position_ids[where].tolist() == list(range(len(example)))
    mask = batch.attention_mask()
    seg = batch.segment_ids
    # no real token attends to another example's token
    r, q, k = torch.nonzero(mask[:, 0], as_tuple=True)
    assert bool((seg[r, q] == seg[r, k]).all()) and bool((k <= q).all())


def test_first_fit_decreasing_respects_capacity():
    lengths = [50, 40, 30, 20, 10, 60]
    rows = first_fit_decreasing(lengths, 70)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 70 for row in rows)
    capacity, rows = choose_layout(lengths, token_cost=1e9)
    assert len(rows) == 1 and capacity == sum(lengths)


def test_micro_batches_cover_examples_once_and_shuffle_with_seed():
    examples = _random_examples(20, 300, seed=2)
    batches = micro_batches(examples, 6, shuffle=True, seed=3)
    assert [b.num_examples for b in batches] == [6, 6, 6, 2]
    assert sum(b.num_tokens for b in batches) == sum(len(e) for e in examples)
    again = micro_batches(examples, 6, shuffle=True, seed=3)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(batches, again))
    other = micro_batches(examples, 6, shuffle=True, seed=4)

    def first_tokens(bs):
        return sorted(bs[0].input_ids[bs[0].segment_ids >= 0].tolist())

    assert first_tokens(batches) != first_tokens(other)

"""The combining rules of adapters/merge.py against PEFT's merge_utils and the papers' formulas.

Each rule runs on stacked random deltas `(n, out, in)`; the reference is PEFT's own function
applied to the same list of deltas (with the global generator seeded like ours for DARE), or a
loop written straight from the paper. The SVD step is checked against Eckart–Young.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from adapters import merge

N, OUT, IN = 3, 24, 40


@pytest.fixture
def deltas():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N, OUT, IN, generator=g)  # (n, out, in)


@pytest.fixture
def weights():
    return torch.tensor([0.7, 1.3, -0.4])


def test_linear_and_task_arithmetic_equal_peft(deltas, weights):
    reference = merge_utils.task_arithmetic(list(deltas), weights)
    torch.testing.assert_close(merge.linear(deltas, weights), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(merge.task_arithmetic(deltas, weights), reference, rtol=0, atol=1e-6)
    # and the plain formula, so the test does not rest on PEFT alone
    by_hand = sum(w * d for w, d in zip(weights.tolist(), deltas))
    torch.testing.assert_close(merge.linear(deltas, weights), by_hand, rtol=0, atol=1e-5)


@pytest.mark.parametrize("density", [0.2, 0.5, 0.9, 1.0])
def test_ties_equals_peft(deltas, weights, density):
    reference = merge_utils.ties(list(deltas), weights, density)
    torch.testing.assert_close(merge.ties(deltas, weights, density), reference, rtol=0, atol=1e-6)


def _ties_by_hand(deltas, weights, density):
    """TIES written entry by entry: trim per task, elect by summed mass, mean of agreeing w·τ."""
    n, rows, cols = deltas.shape
    k = int(density * rows * cols)
    trimmed = []
    for d in deltas:
        threshold = d.abs().reshape(-1).sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    out = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            values = [float(t[i, j]) for t in trimmed]
            sign = 1.0 if sum(values) >= 0 else -1.0
            agree = [w * v for w, v in zip(weights.tolist(), values) if v != 0 and (v > 0) == (sign > 0)]
            out[i, j] = sum(agree) / max(1, len(agree))
    return out


def test_ties_equals_the_paper_formula(deltas, weights):
    small = deltas[:, :6, :7]
    torch.testing.assert_close(merge.ties(small, weights, 0.4), _ties_by_hand(small, weights, 0.4), rtol=0, atol=1e-6)


def test_ties_trims_to_density_and_keeps_only_elected_signs(deltas):
    ones = torch.ones(N)
    trimmed = merge.trim_magnitude(deltas[0], 0.25)
    assert int((trimmed != 0).sum()) == int(0.25 * OUT * IN)
    merged = merge.ties(deltas, ones, 0.25)
    mass = torch.stack([merge.trim_magnitude(d, 0.25) for d in deltas]).sum(0)
    # wherever the merge is non-zero it carries the elected (total-mass) sign
    nonzero = merged != 0
    assert torch.equal(merged[nonzero].sign(), torch.where(mass >= 0, 1.0, -1.0)[nonzero])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.3, 0.7])
def test_dare_equals_peft_with_the_same_generator_state(deltas, weights, method, density):
    seed = 99
    ours = getattr(merge, method)(deltas, weights, density, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # PEFT draws from the global generator
    reference = getattr(merge_utils, method)(list(deltas), weights, density)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_dare_linear_equals_the_paper_formula(deltas, weights):
    """Drop with probability 1-p... written with the masks drawn the same way, in the same order."""
    density, seed = 0.4, 7
    g = torch.Generator().manual_seed(seed)
    masks = [torch.bernoulli(torch.full_like(d, density), generator=g) for d in deltas]
    by_hand = sum(w * (m * d) / density for w, m, d in zip(weights.tolist(), masks, deltas))
    ours = merge.dare_linear(deltas, weights, density, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(ours, by_hand, rtol=0, atol=1e-5)
    kept = float(masks[0].mean())
    assert abs(kept - density) < 0.1  # the drop rate is what was asked for


def test_dare_is_seeded(deltas, weights):
    a = merge.dare_ties(deltas, weights, 0.5, torch.Generator().manual_seed(1))
    b = merge.dare_ties(deltas, weights, 0.5, torch.Generator().manual_seed(1))
    c = merge.dare_ties(deltas, weights, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_svd_refactor_is_exact_when_the_rank_suffices():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(OUT, 5, generator=g) @ torch.randn(5, IN, generator=g)  # rank 5
    A, B, error = merge.svd_refactor(delta, 5)
    assert A.shape == (5, IN) and B.shape == (OUT, 5)
    assert error < 1e-6
    torch.testing.assert_close(B @ A, delta, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_svd_refactor_error_is_the_eckart_young_bound(deltas, rank):
    delta = deltas[0]
    A, B, error = merge.svd_refactor(delta, rank)
    sigma = torch.linalg.svdvals(delta.double())
    bound = float((sigma[rank:] ** 2).sum().sqrt() / (sigma**2).sum().sqrt())
    assert error == pytest.approx(bound, rel=1e-5)
    measured = torch.linalg.matrix_norm(delta - B @ A) / torch.linalg.matrix_norm(delta)
    assert float(measured) == pytest.approx(bound, rel=1e-4)


def test_svd_refactor_of_a_zero_delta():
    A, B, error = merge.svd_refactor(torch.zeros(OUT, IN), 4)
    assert error == 0.0 and torch.count_nonzero(B @ A) == 0


@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT)])  # both Gram sides
def test_svd_refactor_matches_torch_svd_on_either_side(shape):
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    A, B, _ = merge.svd_refactor(delta, 6)
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    best = (U[:, :6] * S[:6]) @ Vh[:6]
    torch.testing.assert_close((B @ A).double(), best, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rank", [2, 7, 20])
def test_factored_refactor_equals_the_dense_one(rank):
    g = torch.Generator().manual_seed(5)
    B, A = torch.randn(OUT, 10, generator=g), torch.randn(10, IN, generator=g)  # delta of rank 10
    A_f, B_f, error_f = merge.svd_refactor_factored(B, A, rank)
    A_d, B_d, error_d = merge.svd_refactor(B @ A, rank)
    torch.testing.assert_close(B_f @ A_f, B_d @ A_d, rtol=0, atol=1e-3)
    assert error_f == pytest.approx(error_d, abs=1e-6)
    assert A_f.shape[0] == min(rank, 10)  # never more directions than the product has
    if rank >= 10:
        assert error_f < 1e-7

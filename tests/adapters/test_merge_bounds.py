"""Merges of hostile numbers answer 4xx, never 500: bounded weights, bounded inputs, and the
result checked with the same numeric bounds as an upload (relative to the base when given).
"""

from __future__ import annotations

import math

import pytest
import torch

from adapters.base import BaseInfo
from adapters.bounds import AdapterBounds, check_bounds
from adapters.errors import AdapterError, AdapterOutOfRange
from adapters.format import write_peft
from adapters.merge import MAX_MERGE_WEIGHT, METHODS, MergeError, MergeInput, merge_adapters
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


@pytest.fixture(scope="module")
def pair(base):
    # alpha = r: updates about as large as the tiny base's weights, like the other test adapters
    return [MergeInput(make_weights(base, rank=2, alpha=2, seed=s), name=f"a{s}") for s in (1, 2)]


@pytest.mark.parametrize("weight", [1e300, -1e300, MAX_MERGE_WEIGHT * 1.01, math.inf, math.nan])
@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_weights_are_a_400_naming_the_input(pair, weight, method):
    inputs = [pair[0], MergeInput(pair[1].weights, weight=weight, name="a2")]
    with pytest.raises(MergeError) as caught:
        merge_adapters(inputs, method)
    error = caught.value
    assert (error.status, error.code, error.param) == (400, "invalid_merge", "adapters")
    assert "a2" in error.message and f"[-{MAX_MERGE_WEIGHT:g}, {MAX_MERGE_WEIGHT:g}]" in error.message


@pytest.mark.parametrize("method", METHODS)
def test_the_largest_weights_merge_to_finite_factors(pair, method):
    """Bounded inputs times bounded weights stay finite; the result is then bounded or refused."""
    inputs = [MergeInput(item.weights, weight=-MAX_MERGE_WEIGHT, name=item.name) for item in pair]
    try:
        result = merge_adapters(inputs, method, density=0.5)
    except AdapterError as exc:
        assert exc.status == 422 and exc.code == "adapter_out_of_range"
        return
    for module in result.weights.modules.values():
        assert torch.isfinite(module.A).all() and torch.isfinite(module.B).all()


def test_a_result_out_of_proportion_to_the_base_is_a_422(pair, base):
    norms = base.weight_norms()
    inputs = [MergeInput(item.weights, weight=50.0, name=item.name) for item in pair]
    with pytest.raises(AdapterOutOfRange) as caught:
        merge_adapters(inputs, "task_arithmetic", base_norms=norms)
    assert "||scaling*B@A||/||W|| = " in caught.value.message and "exceeds 8" in caught.value.message
    # the same merge at ordinary weights passes, and its result passes an upload's validation
    halves = [MergeInput(item.weights, weight=0.5, name=item.name) for item in pair]
    result = merge_adapters(halves, "task_arithmetic", base_norms=norms)
    check_bounds(result.weights, norms, AdapterBounds())


def test_inputs_out_of_bounds_or_non_finite_are_refused(pair, base):
    huge = make_weights(base, rank=2, seed=3)
    next(iter(huge.modules.values())).A[0, 0] = 3e38
    with pytest.raises(AdapterOutOfRange, match=r"max \|lora_A\| = 3e\+38 exceeds 10000"):
        merge_adapters([pair[0], MergeInput(huge, name="huge")], "cat")
    nan = make_weights(base, rank=2, seed=4)
    next(iter(nan.modules.values())).B[0, 0] = math.nan
    with pytest.raises(AdapterOutOfRange, match="nan: .* holds NaN or Inf"):
        merge_adapters([pair[0], MergeInput(nan, name="nan")], "linear")


def test_a_merged_adapter_round_trips_through_validation(pair, base, tmp_path):
    result = merge_adapters(pair, "ties", density=0.5, base_norms=base.weight_norms())  # TIES averages
    directory = write_peft(result.weights, tmp_path / "merged", provenance=result.provenance)
    assert validate_adapter_dir(directory, base).weights.modules.keys() == result.weights.modules.keys()

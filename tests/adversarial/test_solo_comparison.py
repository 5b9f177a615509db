"""`assert_same_as_solo`, the suite's one comparison of a concurrent stream with its solo run,
on hand-made results (no server): what it lets through and what it catches."""

from __future__ import annotations

import pytest

from tests.adversarial.clients import LOGPROB_NOISE, NEAR_TIE, StreamResult, assert_same_as_solo


def _run(tokens, logprobs=None, runner_ups=None, leads=None) -> StreamResult:
    n = len(tokens)
    return StreamResult(
        200,
        tokens=list(tokens),
        logprobs=list(logprobs or [-0.5] * n),
        runner_ups=list(runner_ups or [99] * n),
        leads=list(leads or [1.0] * n),
        done=True,
    )


SOLO = _run([5, 6, 7, 8], runner_ups=[50, 60, 70, 80], leads=[1.0, NEAR_TIE / 10, 2.0, 2.0])


def test_identical_runs_match():
    assert_same_as_solo(_run([5, 6, 7, 8]), SOLO, "same")


def test_a_branch_to_the_runner_up_at_a_near_tie_is_rounding():
    # token 1's lead was a near-tie: taking the runner-up there is allowed, and what follows
    # (another context) is not compared
    assert_same_as_solo(_run([5, 60, 1, 2]), SOLO, "near tie")


@pytest.mark.parametrize(
    "tokens",
    [
        [5, 6, 70, 8],  # token 2 led by 2 nats: not rounding
        [5, 61, 7, 8],  # a near-tie, but a token that was not the runner-up
        [9, 6, 7, 8],  # the first token, led by 1 nat
        [5, 6, 7],  # a short stream
    ],
)
def test_other_divergences_fail(tokens):
    with pytest.raises(AssertionError):
        assert_same_as_solo(_run(tokens), SOLO, "diverged")


def test_a_moved_logprob_fails_even_with_equal_tokens():
    moved = _run([5, 6, 7, 8], logprobs=[-0.5, -0.5 - 2 * LOGPROB_NOISE, -0.5, -0.5])
    with pytest.raises(AssertionError, match="logprob moved"):
        assert_same_as_solo(moved, SOLO, "contaminated")

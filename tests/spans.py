"""Mask spans for tests: the maximal runs of ids a loss mask selects."""

from __future__ import annotations


def masked_runs(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """Each maximal run of consecutive ids whose mask is true, in order."""
    runs, current = [], []
    for token, masked in zip(ids, mask):
        if masked:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs

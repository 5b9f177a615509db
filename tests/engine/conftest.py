"""Engine tests run torch single-threaded: the 2 shared cores make OpenMP threads spin on each other.
`eager` switches the native kernels (server/engine/fused.py) off for a block."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eager():
    """`with eager:` runs a block with the native kernels off, restoring them after."""
    from server.engine import fused

    was = fused.enabled()

    class Switch:
        def __enter__(self):
            fused.set_enabled(False)

        def __exit__(self, *exc):
            fused.set_enabled(was)

    yield Switch()
    fused.set_enabled(was)

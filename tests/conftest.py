"""Shared fixtures: the tiny in-process base and (when needed) the real default base."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import build_tiny_base

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A 2-layer random Llama + BPE tokenizer saved as an HF directory (shared, read-only)."""
    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def default_base_dir():
    """The real SmolLM2-135M-Instruct, converted once into the cache."""
    from adapters.base import resolve_base

    return resolve_base("default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

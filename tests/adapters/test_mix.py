"""A mix of adapters as one LoRA (adapters/mix.py): the composition against the formula
`sum_k w_k * s_k * B_k A_k x`, its identity, and agreement with the saved `cat` merge."""

from __future__ import annotations

import pytest
import torch

from adapters.format import LoraModule, LoraWeights
from adapters.merge import MergeInput, merge_adapters
from adapters.mix import MIX_PREFIX, canonical_parts, compose_mix, mix_id, mix_ranks

IN, OUT = 12, 10


def _adapter(seed: int, ranks: dict[str, int], scaling: float) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    modules = {
        path: LoraModule(torch.randn(r, IN, generator=gen), torch.randn(OUT, r, generator=gen), scaling)
        for path, r in ranks.items()
    }
    return LoraWeights(config={}, modules=modules)


@pytest.fixture
def components() -> list[tuple[LoraWeights, float]]:
    # different ranks, scalings and (partly) different modules, a negative weight
    return [
        (_adapter(1, {"q": 2, "v": 3}, 2.0), 0.7),
        (_adapter(2, {"q": 4, "o": 1}, 0.5), -1.3),
        (_adapter(3, {"v": 5}, 4.0), 0.25),
    ]


def test_composed_mix_equals_the_weighted_sum_of_updates(components):
    mixed = compose_mix(components)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for path in ("q", "v", "o"):
        expected = torch.zeros(7, OUT, dtype=torch.float64)
        for weights, w in components:
            if path in weights.modules:
                m = weights.modules[path]
                expected += w * m.scaling * (x @ m.A.double().T @ m.B.double().T)
        got = mixed.modules[path]
        assert got.scaling == 1.0
        out = got.scaling * (x @ got.A.double().T @ got.B.double().T)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert mix_ranks([w for w, _ in components]) == {"q": 6, "v": 8, "o": 1}
    assert {path: m.rank for path, m in mixed.modules.items()} == {"q": 6, "v": 8, "o": 1}


def test_composed_mix_is_exactly_the_cat_merge(components):
    merged = merge_adapters([MergeInput(weights=w, weight=x) for w, x in components], "cat").weights
    mixed = compose_mix(components)
    assert set(merged.modules) == set(mixed.modules)
    for path, module in merged.modules.items():
        assert torch.equal(mixed.modules[path].A, module.A)
        assert torch.equal(mixed.modules[path].B, module.B)
        assert mixed.modules[path].scaling == module.scaling == 1.0


def test_mix_id_is_order_free_and_exact_in_the_weights():
    parts = [("sha-a", 0.7), ("sha-b", 0.3)]
    assert mix_id(parts) == mix_id(list(reversed(parts)))
    assert mix_id(parts).startswith(MIX_PREFIX)
    assert mix_id(parts) != mix_id([("sha-a", 0.7), ("sha-b", 0.30000000000000004)])
    assert mix_id(parts) != mix_id([("sha-a", 0.3), ("sha-b", 0.7)])
    assert mix_id([("sha-a", 1)]) == mix_id([("sha-a", 1.0)])  # an int weight is the same number
    assert canonical_parts([("b", 1.0), ("a", 2.0), ("a", -1.0)]) == [("a", -1.0), ("a", 2.0), ("b", 1.0)]


def test_modules_whose_shapes_differ_cannot_mix():
    a = LoraWeights(config={}, modules={"q": LoraModule(torch.ones(2, IN), torch.ones(OUT, 2), 1.0)})
    b = LoraWeights(config={}, modules={"q": LoraModule(torch.ones(2, IN + 1), torch.ones(OUT, 2), 1.0)})
    with pytest.raises(ValueError, match="different shapes"):
        compose_mix([(a, 1.0), (b, 1.0)])

"""The prepacked bf16 projections (server/engine/packed.py) against the plain `F.linear` path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine import packed
from server.engine.lora import MultiLoraLinear, build_lora_step
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine

pytestmark = pytest.mark.skipif(
    not packed.supported(torch.device("cpu"), torch.bfloat16), reason="this CPU has no oneDNN bf16"
)


@pytest.mark.parametrize("rows", [0, 1, 3, 16, 70])
def test_packed_linear_equals_f_linear(rows):
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 64, dtype=torch.bfloat16), torch.randn(96, dtype=torch.bfloat16)
    layer = packed.PackedLinear(weight, bias)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=0, atol=0)
    assert torch.equal(layer.dense_weight(), weight)  # unpack is exact


def test_only_bf16_on_the_cpu_is_packed():
    assert not packed.supported(torch.device("cpu"), torch.float32)
    assert not packed.supported(torch.device("meta"), torch.bfloat16)
    plain = torch.randn(4, 3)
    assert packed.unpack(plain) is plain


def _generate(base_dir, adapters):
    engine = tiny_engine(base_dir, dtype="bfloat16")
    try:
        return engine.generate(PROMPTS[: len(adapters)], adapters, GREEDY), engine.model
    finally:
        engine.close()


def test_packed_engine_equals_the_plain_bf16_engine(tiny_base_dir, tmp_path, monkeypatch):
    """Base and adapter rows in one batch: token for token what plain bf16 weights give."""
    adapter = make_adapter(tmp_path / "all8", tiny_base_dir, 8, seed=5)
    mixed = [None, adapter, None, adapter]
    got, model = _generate(tiny_base_dir, mixed)
    assert isinstance(next(iter(model.lora_layers().values())).base, packed.PackedLinear)
    assert model.lm_head_weight.is_mkldnn
    monkeypatch.setattr(packed, "supported", lambda device, dtype: False)
    plain, model = _generate(tiny_base_dir, mixed)
    assert not isinstance(next(iter(model.lora_layers().values())).base, packed.PackedLinear)
    assert got == plain


def test_a_packed_fold_equals_f_linear_on_its_dense_weight():
    torch.manual_seed(0)
    weight = torch.randn(2 * 24, 32, dtype=torch.bfloat16)
    layer = MultiLoraLinear(packed.PackedLinear(weight, None), 32, [("k", 24), ("v", 24)], 2, 4, torch.bfloat16, "cpu")
    A, Bt = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(4, 24, dtype=torch.bfloat16)
    layer.load_slot(1, {"k": (A, Bt, 0.5), "v": (A, Bt, 2.0)})
    dense = layer.dense_weight(1)
    assert torch.equal(layer.dense_weight(0), weight)  # the base unpacked exactly
    layer.fold(1, torch.bfloat16)
    assert layer.folded_weight.is_mkldnn
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    folded = layer(x, build_lora_step([1] * 5, 1, "cpu", torch.bfloat16, fold_slot=1))
    assert torch.equal(folded, F.linear(x, dense))

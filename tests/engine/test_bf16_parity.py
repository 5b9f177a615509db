"""The dense bf16 path (`quant="none", dtype="bfloat16"`, issue 15) against Hugging Face `generate` in bf16.

On CPUs with AMX-BF16/AVX512-BF16, oneDNN's bf16 GEMM is several times faster than fp32 at decode
batch sizes, so this path must be as trustworthy as the fp32 one: greedy tokens equal
transformers' bf16 `generate` on the tiny base, with and without adapters in the batch.
"""

from __future__ import annotations

import torch

from tests.engine.helpers import hf_greedy, make_adapter
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine


def _hf_bf16(base_dir, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter.path)).eval()
    return model


def test_bf16_base_greedy_equals_hf_bf16_generate(tiny_base_dir):
    engine = tiny_engine(tiny_base_dir, dtype="bfloat16")
    try:
        got = engine.generate(PROMPTS, sampling=GREEDY)
    finally:
        engine.close()
    model = _hf_bf16(tiny_base_dir)
    assert got == [hf_greedy(model, p, GREEDY.max_tokens) for p in PROMPTS]


def test_bf16_mixed_batch_equals_peft_bf16(tiny_base_dir, tmp_path):
    adapter = make_adapter(tmp_path / "all8", tiny_base_dir, 8, seed=2)
    engine = tiny_engine(tiny_base_dir, dtype="bfloat16")
    try:
        # base and adapter rows share every step: the grouped LoRA path runs in bf16
        got = engine.generate(PROMPTS[:3] * 2, [None] * 3 + [adapter] * 3, GREEDY)
    finally:
        engine.close()
    base = _hf_bf16(tiny_base_dir)
    assert got[:3] == [hf_greedy(base, p, GREEDY.max_tokens) for p in PROMPTS[:3]]
    peft = _hf_bf16(tiny_base_dir, adapter)
    ref = [hf_greedy(peft, p, GREEDY.max_tokens) for p in PROMPTS[:3]]
    # PEFT computes B(A(x)) in bf16 with its own rounding order; the first tokens must agree
    # exactly and the rest nearly everywhere (a bf16 near-tie may flip one late token)
    for tokens, expected in zip(got[3:], ref):
        assert tokens[:4] == expected[:4], (tokens, expected)
        assert sum(a == b for a, b in zip(tokens, expected)) >= len(expected) - 2, (tokens, expected)


def test_bf16_slots_equal_peft_on_weights_bf16_holds_exactly(tiny_base_dir, tmp_path):
    """`lora_dtype="bfloat16"` rounds only the stored A and B: on an adapter whose float32 weights
    bf16 holds exactly (and a power-of-two scaling, 16 / 8), it serves what PEFT's float32 adapter
    does, under the same assertions as the float32 slots above."""
    adapter = make_adapter(tmp_path / "exact", tiny_base_dir, 8, seed=2, bf16_exact=True)
    engine = tiny_engine(tiny_base_dir, dtype="bfloat16", lora_dtype="bfloat16")
    try:
        layer = next(iter(engine.model.lora_layers().values()))
        assert layer.A.dtype == layer.Bt.dtype == torch.bfloat16
        got = engine.generate(PROMPTS[:3] * 2, [None] * 3 + [adapter] * 3, GREEDY)
    finally:
        engine.close()
    peft = _hf_bf16(tiny_base_dir, adapter)
    ref = [hf_greedy(peft, p, GREEDY.max_tokens) for p in PROMPTS[:3]]
    for tokens, expected in zip(got[3:], ref):
        assert tokens[:4] == expected[:4], (tokens, expected)
        assert sum(a == b for a, b in zip(tokens, expected)) >= len(expected) - 2, (tokens, expected)

"""The engine on CUDA: NF4 parity with transformers + bitsandbytes, LoRA parity, and a throughput run.

Skipped without CUDA (see tests/conftest.py). bf16 compute makes long greedy runs sensitive to
kernel choice, so parity is checked over a short horizon.
"""

from __future__ import annotations

import time

import pytest
import torch

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_bases import chat_prompts

pytestmark = pytest.mark.gpu
SHORT = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def cuda_engine(base, **kw):
    params = dict(base=base, quant="nf4", device="cuda", max_model_len=1024, kv_cache_bytes=256 * 2**20, fold="off")
    params.update(kw)
    return Engine(EngineConfig(**params))


def hf_nf4(base):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=config, dtype=torch.bfloat16, device_map="cuda"
    ).eval()


def greedy(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


def test_nf4_cuda_equals_transformers_bitsandbytes(default_base_dir):
    engine = cuda_engine(default_base_dir)
    prompts = chat_prompts(engine.tokenizer)
    got = engine.generate(prompts, sampling=SHORT)
    model = hf_nf4(default_base_dir)
    assert got == [greedy(model, p, SHORT.max_tokens) for p in prompts]


def test_lora_cuda_equals_peft(default_base_dir, tmp_path):
    from peft import PeftModel

    adapter = make_adapter(tmp_path / "a", default_base_dir, 16, seed=1, std=0.02)
    engine = cuda_engine(default_base_dir, quant="none", dtype="float32")
    prompts = chat_prompts(engine.tokenizer)
    got = engine.generate(prompts, [adapter] * len(prompts), SHORT)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(default_base_dir), dtype=torch.float32).cuda().eval()
    model = PeftModel.from_pretrained(base, str(adapter.path)).eval()
    assert got == [greedy(model, p, SHORT.max_tokens) for p in prompts]


def test_throughput_mixed_adapters(default_base_dir, tmp_path):
    adapters = [make_adapter(tmp_path / f"a{i}", default_base_dir, 16, seed=i, std=0.01) for i in range(8)]
    engine = cuda_engine(default_base_dir)
    prompts = chat_prompts(engine.tokenizer) * 32  # 64 requests
    sp = SamplingParams(max_tokens=64, min_tokens=64, temperature=0)
    engine.generate(prompts[:8], adapters, SamplingParams(max_tokens=4))  # warm up, load slots
    results = {}
    for name, chosen in (
        ("base", [None] * len(prompts)),
        ("8 adapters", [adapters[i % 8] for i in range(len(prompts))]),
    ):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, chosen, sp)
        torch.cuda.synchronize()
        results[name] = sum(len(o) for o in out) / (time.perf_counter() - start)
        assert all(len(o) == 64 for o in out)
    print("CUDA NF4 tok/s:", {k: round(v, 1) for k, v in results.items()})

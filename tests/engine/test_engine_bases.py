"""Engine greedy tokens on real weights: the default SmolLM2 base (fp32) and NF4 against bitsandbytes.

The NF4 reference is transformers' own 4-bit path (`BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32)`): both sides quantize the same fp32
weights with the same bitsandbytes kernels, so greedy tokens must agree exactly.
"""

from __future__ import annotations

import torch

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.types import SamplingParams
from tests.engine.helpers import hf_greedy, hf_model
from tests.engine.test_engine_parity import PROMPTS

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
]


def chat_prompts(tokenizer, conversations=MESSAGES) -> list[list[int]]:
    out = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def nf4_reference(base_dir):
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return hf_model(base_dir, quantization_config=config, device_map="cpu")


def test_default_base_greedy_equals_hf_generate(default_base_dir):
    engine = Engine(
        EngineConfig(
            base=default_base_dir,
            quant="none",
            dtype="float32",
            device="cpu",
            max_model_len=512,
            kv_cache_bytes=64 * 2**20,
            fold="off",
        )
    )
    prompts = chat_prompts(engine.tokenizer)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    got = engine.generate(prompts, sampling=sp)
    model = hf_model(default_base_dir)
    assert got == [hf_greedy(model, p, 16) for p in prompts]


def test_nf4_tiny_equals_transformers_bitsandbytes(tiny_base_dir):
    engine = Engine(
        EngineConfig(
            base=tiny_base_dir,
            quant="nf4",
            dtype="float32",
            device="cpu",
            max_model_len=256,
            num_kv_blocks=64,
            block_size=4,
            fold="off",
        )
    )
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = engine.generate(PROMPTS, sampling=sp)
    ref_model = nf4_reference(tiny_base_dir)
    ref = [hf_greedy(ref_model, p, 12) for p in PROMPTS]
    assert got == ref
    plain = [hf_greedy(hf_model(tiny_base_dir), p, 12) for p in PROMPTS]
    assert ref != plain, "NF4 did not change any output; the comparison proves nothing"


def test_nf4_default_base_equals_transformers_bitsandbytes(default_base_dir):
    engine = Engine(
        EngineConfig(  # float32 activations, as the reference computes ("auto" is bf16 on AMX CPUs)
            base=default_base_dir,
            quant="nf4",
            dtype="float32",
            device="cpu",
            max_model_len=512,
            kv_cache_bytes=64 * 2**20,
            fold="off",
        )
    )
    prompts = chat_prompts(engine.tokenizer)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = engine.generate(prompts, sampling=sp)
    ref_model = nf4_reference(default_base_dir)
    assert got == [hf_greedy(ref_model, p, 12) for p in prompts]


def test_nf4_fold_leaves_the_base_intact(tiny_base_dir, tmp_path):
    """Folding dequantizes the NF4 weights; the quantized base must serve exactly as before."""
    from tests.engine.helpers import make_adapter

    adapter = make_adapter(tmp_path / "a", tiny_base_dir, 4, seed=5)
    engine = Engine(
        EngineConfig(
            base=tiny_base_dir,
            quant="nf4",
            dtype="float32",
            device="cpu",
            max_model_len=256,
            num_kv_blocks=64,
            block_size=4,
            fold="auto",
        )
    )
    engine.fold.min_rows = 1  # fold even these 2-row steps (the NF4 policy waits for 12 rows)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    before = engine.generate(PROMPTS, sampling=sp)
    unfolded = engine.generate(PROMPTS[:2], [adapter, None], sp)
    engine.pin(adapter)
    folded = engine.generate(PROMPTS[:2], [adapter] * 2, sp)
    assert engine.fold.stats.folds == 1
    assert engine.generate(PROMPTS, sampling=sp) == before
    # the NF4 projections compute in fp32 (or bitsandbytes' bf16), the dense fold in bf16 on a
    # bf16-capable CPU: close, not bit-equal
    agree = sum(a == b for a, b in zip(folded[0], unfolded[0]))
    assert agree >= 6, (folded[0], unfolded[0])


def test_fold_dtype_is_bf16_only_for_nf4_on_a_bf16_capable_cpu():
    from server.engine.fold import fold_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fold_dtype("none", cpu, torch.float32) == torch.float32
    assert fold_dtype("nf4", cuda, torch.bfloat16) == torch.bfloat16
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert fold_dtype("nf4", cpu, torch.float32) == expected


def test_auto_dtype_is_bf16_only_for_nf4_where_amx_runs():
    from server.engine import fused
    from server.engine.loader import resolve_device_dtype

    amx = fused.amx_available()
    assert resolve_device_dtype("cpu", "auto", "nf4") == (torch.device("cpu"), torch.bfloat16 if amx else torch.float32)
    assert resolve_device_dtype("cpu", "auto", "none") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "float32", "nf4") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cuda", "auto", "none")[1] == torch.bfloat16

"""Shared helpers for engine tests: random PEFT adapters and Hugging Face reference generations."""

from __future__ import annotations

from pathlib import Path

import torch

from adapters.base import LINEAR_MODULES, BaseInfo
from adapters.format import LoraModule, LoraWeights, module_scaling, peft_config, write_peft
from server.engine.types import AdapterRef


def make_adapter(
    directory: Path,
    base_dir: Path,
    rank: int,
    targets=LINEAR_MODULES,
    *,
    alpha: float = 16,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.2,
    rank_pattern: dict | None = None,
    bf16_exact: bool = False,
) -> AdapterRef:
    """Write a PEFT adapter with random non-zero A and B for `targets` of every layer
    (`bf16_exact`: float32 values that bf16 holds exactly)."""
    info = BaseInfo.from_dir(base_dir, with_fingerprint=False)
    config = peft_config(rank, alpha, list(targets), use_rslora=use_rslora, rank_pattern=rank_pattern)
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(info.num_layers):
        for proj in targets:
            path = info.module_path(layer, proj)
            r = rank
            for key, value in (rank_pattern or {}).items():
                if path.endswith(key):
                    r = value
            fan_in, fan_out = info.linear_shapes[proj]
            A = torch.randn(r, fan_in, generator=gen) * std
            B = torch.randn(fan_out, r, generator=gen) * std
            if bf16_exact:
                A, B = A.bfloat16().float(), B.bfloat16().float()
            modules[path] = LoraModule(A, B, module_scaling(config, path, r))
    write_peft(LoraWeights(config, modules), directory)
    return AdapterRef(id=f"{directory.name}-{seed}", path=directory)


def hf_model(base_dir: Path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **kw).eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        # An explicit mask: otherwise HF masks every prompt token equal to pad (= <|im_end|> here).
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=model.config.eos_token_id if stop_at_eos else None,
            pad_token_id=model.config.pad_token_id,
        )
    return out[0, len(prompt) :].tolist()


def peft_greedy(base_dir: Path, adapter: AdapterRef, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from peft import PeftModel

    model = PeftModel.from_pretrained(hf_model(base_dir), str(adapter.path)).eval()
    return [hf_greedy(model, p, max_new_tokens) for p in prompts]


def assert_poison_stays_in_its_row(kernel, x: torch.Tensor) -> None:
    """Tenants share a batch: a NaN and an inf in one token's activations (a hostile adapter's
    output) must reach only that token's outputs of `kernel(x)`; every other row keeps its bits."""
    row = x.shape[0] // 2
    clean = kernel(x)
    poisoned = x.clone()
    poisoned[row, 3] = float("nan")
    poisoned[row, 70] = float("inf")
    got = kernel(poisoned)
    others = [r for r in range(x.shape[0]) if r != row]
    assert torch.equal(got[others], clean[others])
    assert not torch.isfinite(got[row].float()).any()

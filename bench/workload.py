"""The deterministic benchmark workload: chat prompts, random LoRA adapters, request plans.

Everything here is a pure function of a seed and the base directory, so every system in a
benchmark run (our engine, transformers + PEFT, the matmul bound) sees exactly the same
requests. Adapters are rank-16, all-linear, with random A and B of a realistic magnitude: A
as PEFT initialises it (Kaiming-uniform) and B scaled so each module's update is a few percent
of the base weight's norm, enough that greedy outputs differ from the base. It knows nothing
about engines or timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.base import LINEAR_MODULES, BaseInfo
from adapters.chat_template import ChatTemplate
from adapters.format import LoraModule, LoraWeights, module_scaling, peft_config, write_peft

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "What is a prime number? Give two examples.",
    "Summarise the plot of Romeo and Juliet.",
    "How do I reverse a list in Python?",
    "Name three planets of the solar system.",
    "What does a compiler do?",
    "Suggest a name for a friendly robot.",
    "How many legs does a spider have?",
    "Describe the taste of a lemon.",
    "What is the boiling point of water at sea level?",
    "Write one sentence encouraging someone to exercise.",
)
RANK = 16
ALPHA = 32
# Relative size of a module's update ||s*B@A|| / ||W0||: trained adapters sit around here.
DELTA_RATIO = 0.08


@dataclass(frozen=True)
class Request:
    """One benchmark request: prompt ids and the index of its adapter (None = the base)."""

    prompt_ids: tuple[int, ...]
    adapter: int | None


def chat_prompts(base_dir: Path, count: int = 16) -> list[list[int]]:
    """`count` rendered single-turn chat prompts (ids), cycling through QUESTIONS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    template = ChatTemplate(tokenizer)
    return [template.render([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]).ids for i in range(count)]


def _base_weight_norms(base_dir: Path) -> dict[str, float]:
    """Frobenius norm of every targetable base weight, by module path (read lazily, one at a time)."""
    from safetensors import safe_open

    norms = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight") and key.rsplit(".", 2)[-2] in LINEAR_MODULES:
                    norms[key[: -len(".weight")]] = float(handle.get_tensor(key).float().norm())
    return norms


def random_adapter(info: BaseInfo, norms: dict[str, float], seed: int, rank: int = RANK) -> LoraWeights:
    """A rank-`rank` all-linear adapter with seeded random A and B (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    config = peft_config(rank, ALPHA, list(LINEAR_MODULES))
    modules = {}
    for path, (fan_in, fan_out) in info.all_module_paths().items():
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform_(a=sqrt(5)) bound
        A = (torch.rand(rank, fan_in, generator=generator) * 2 - 1) * bound  # (r, in)
        B = torch.randn(fan_out, rank, generator=generator)  # (out, r)
        scaling = module_scaling(config, path, rank)
        # Rescale B so that ||scaling * B @ A|| == DELTA_RATIO * ||W0|| for this module.
        # ||B @ A||_F^2 = sum((B^T B) * (A A^T)): two (r, r) products instead of the (out, in) one.
        current = scaling * float(((B.T @ B) * (A @ A.T)).sum().sqrt())
        B = B * (DELTA_RATIO * norms[path] / current)
        modules[path] = LoraModule(A=A.contiguous(), B=B.contiguous(), scaling=scaling)
    return LoraWeights(config=config, modules=modules)


def write_adapters(base_dir: Path, out_dir: Path, count: int, seed: int = 1234) -> list[Path]:
    """Write `count` distinct random adapters under `out_dir` (reused when already there)."""
    info = BaseInfo.from_dir(base_dir, with_fingerprint=False)
    norms = None
    paths = []
    for index in range(count):
        directory = out_dir / f"adapter-{seed}-{index:03d}"
        if not (directory / "adapter_model.safetensors").is_file():
            norms = norms if norms is not None else _base_weight_norms(base_dir)
            write_peft(random_adapter(info, norms, seed + index), directory)
        paths.append(directory)
    return paths


def round_robin(prompts: list[list[int]], num_adapters: int | None, count: int | None = None) -> list[Request]:
    """`count` requests (default: one per prompt) over the prompts, adapters assigned round-robin.

    `num_adapters=None` gives base-only requests; `num_adapters=1` sends every request to adapter 0.
    """
    count = len(prompts) if count is None else count
    return [
        Request(tuple(prompts[i % len(prompts)]), None if num_adapters is None else i % num_adapters)
        for i in range(count)
    ]

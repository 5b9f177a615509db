"""EngineConfig: every knob of the serving engine, validated once, frozen afterwards.

The server's settings (`server.settings.ServerConfig.to_engine_config`) map onto this dataclass
and take their defaults from it; tests build one in a line
(`EngineConfig(base=path, quant="none")`). It knows nothing about models or tensors beyond
dtype names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

Quant = Literal["nf4", "none"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
Fold = Literal["off", "auto", "pinned"]
PrefixCacheScope = Literal["tenant", "global"]
LoraDType = Literal["auto", "bfloat16"]
QUANT_CHOICES = get_args(Quant)
DTYPE_CHOICES = get_args(DType)
DEVICE_CHOICES = get_args(Device)
FOLD_CHOICES = get_args(Fold)
PREFIX_CACHE_SCOPE_CHOICES = get_args(PrefixCacheScope)
LORA_DTYPE_CHOICES = get_args(LoraDType)


@dataclass(frozen=True)
class EngineConfig:
    """Args:
    base: a local Hugging Face directory of a Llama-family decoder (see `adapters.base.resolve_base`).
    quant: "nf4" (bitsandbytes Linear4bit) or "none" (plain nn.Linear).
    dtype: compute dtype; "auto" = bfloat16 on CUDA, and on a CPU bfloat16 for an NF4 base
        where its projections run on AMX, float32 otherwise (loader.resolve_device_dtype).
    device: "cpu", "cuda" or "auto".
    max_loras: device slots for adapters (slot 0, the base, is extra).
    max_cpu_loras: adapters kept in the host cache (LRU).
    max_cpu_lora_bytes: bytes the host cache may hold (LRU; the newest adapter always stays).
    loader_threads: adapters read from disk in parallel, so one slow load does not hold the rest.
    adapter_load_timeout_s: a load running longer fails only that adapter's requests (503).
    max_rank: the largest adapter rank a slot can hold (the server also refuses larger uploads).
    max_model_len: prompt + completion tokens per sequence.
    max_num_seqs: sequences in the running batch.
    max_num_batched_tokens: tokens per step (prefill chunks + decodes).
    block_size: tokens per KV block.
    num_kv_blocks: KV blocks per layer; None derives it from kv_cache_bytes.
    kv_cache_bytes: memory budget for the whole KV cache when num_kv_blocks is None.
    fold: "off"; "pinned" folds pinned adapters; "auto" also folds an adapter that owned all
        running traffic for fold_window steps.
    fold_window: steps of sole ownership before an auto fold.
    fold_budget: bytes allowed for dense folded weight copies.
    enable_prefix_caching: reuse the KV blocks of prompt prefixes computed before (prefix_cache.py).
    prefix_cache_scope: "tenant" shares cached blocks only within a tenant (no tenant can learn
        another's prompts from timing); "global" shares them across tenants, an opt-in for
        single-tenant deployments.
    fold_slice_bytes: dense bytes a fold builds per step (the build is spread over steps so no
        step stalls for all of it); 0 builds it in one step.
    native_kernels: run the step's small ops, the LoRA update and decode attention through the
        C kernels of fused.py on a CPU (eager PyTorch ops when off or when no compiler is found).
        Process-wide: the last engine built sets it.
    lora_dtype: what the adapter slots store. "auto": float32 on a CPU (PEFT keeps adapter
        weights in float32 under a bf16 model), the compute dtype on CUDA. "bfloat16": bf16
        slots (vLLM's default for a bf16 model), half the bytes each step streams with several
        adapters in a batch; the LoRA math stays float32 on a CPU. An opt-in: rounding A and B
        to bf16 moves near-tie greedy tokens away from PEFT's float32 adapters.
    """

    base: Path | str
    quant: Quant = "nf4"
    dtype: DType = "auto"
    device: Device = "auto"
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_cpu_lora_bytes: int = 4 * 2**30
    loader_threads: int = 4
    adapter_load_timeout_s: float = 60.0
    max_rank: int = 64
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int = 512 * 2**20
    fold: Fold = "auto"
    fold_window: int = 32  # steps; a dense build costs ~1 s on a CPU, so do not flap
    fold_budget: int = 1 * 2**30
    enable_prefix_caching: bool = True
    prefix_cache_scope: PrefixCacheScope = "tenant"
    fold_slice_bytes: int = 64 * 2**20  # ~0.1 s of dense build per step on a 2-core CPU
    native_kernels: bool = True
    lora_dtype: LoraDType = "auto"

    def __post_init__(self):
        if self.quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {self.quant!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")
        if self.fold not in FOLD_CHOICES:
            raise ValueError(f"fold must be one of {FOLD_CHOICES}, got {self.fold!r}")
        if self.lora_dtype not in LORA_DTYPE_CHOICES:
            raise ValueError(f"lora_dtype must be one of {LORA_DTYPE_CHOICES}, got {self.lora_dtype!r}")
        if self.prefix_cache_scope not in PREFIX_CACHE_SCOPE_CHOICES:
            raise ValueError(
                f"prefix_cache_scope must be one of {PREFIX_CACHE_SCOPE_CHOICES}, got {self.prefix_cache_scope!r}"
            )
        for name in (
            "max_model_len",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "max_rank",
            "fold_window",
            "loader_threads",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.adapter_load_timeout_s > 0:
            raise ValueError(f"adapter_load_timeout_s must be > 0, got {self.adapter_load_timeout_s}")
        for name in (
            "max_loras",
            "max_cpu_loras",
            "max_cpu_lora_bytes",
            "fold_budget",
            "fold_slice_bytes",
            "kv_cache_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

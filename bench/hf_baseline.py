"""The reference systems measured next to our engine: transformers + PEFT, and the matmul bound.

- (c) `peft_generate`: one PeftModel holding every adapter, one left-padded batch, greedy,
  `adapter_names=[...]` per row (PEFT's mixed-batch forward), `min_new_tokens = max_new_tokens`.
- (d) `matmul_bound`: a (batch, hidden) activation pushed through every linear weight of the
  model in order (each layer's q, k, v, o, gate, up, down, then lm_head), once per decode
  step: the ceiling any decode step with these weights can reach. Each runs on the fastest
  kernel here, the one the engine runs (server/engine/packed.py): bf16 weights prepacked for
  oneDNN, float32 through our tile kernel (1.8x MKL's `F.linear` at batch 16), else
  `F.linear`. Under NF4 the same reasoning picks the engine's NF4 kernel over the layers'
  bitsandbytes storage (server/engine/nf4.py), about twice as fast as bitsandbytes' CPU kernel
  at batch 16; where it does not run (no AVX-512, no compiler) the layers' own
  `Linear4bit.forward` stands in, the work an NF4 decode step cannot avoid.
- (e) `peft_load_times`: `PeftModel.load_adapter` wall time for one adapter, repeated.

Nothing here knows our engine (packed.py and nf4.py are kernel helpers); `engine_bench.py` puts
the figures side by side.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import torch

from adapters.base import LINEAR_MODULES
from server.engine import fused, packed
from server.engine.nf4 import NF4Linear

BASE_NAME = "__base__"  # PEFT's adapter_names value for "no adapter" in a mixed batch
# The NF4 kernel over each bitsandbytes layer of a loaded model, for the matmul bound: made at
# load, because bitsandbytes' first CPU forward repacks the storage the kernel reads.
_NF4_KERNELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def load_hf_model(base_dir: Path, quant: str, dtype: torch.dtype):
    """The base as a transformers model on the CPU: fp32/bf16 weights or bitsandbytes NF4."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs).eval()
    if quant == "nf4":
        for module in model.modules():
            if type(module).__name__ == "Linear4bit" and module.weight.device.type == "cpu":
                _NF4_KERNELS[module] = NF4Linear(module)
    return model


def adapter_name(index: int) -> str:
    return f"a{index}"


def load_peft(model, adapter_dirs: list[Path]):
    """Wrap `model` in a PeftModel holding every adapter in `adapter_dirs` as a0, a1, ..."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=adapter_name(0))
    for index, directory in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(str(directory), adapter_name=adapter_name(index))
    return peft_model.eval()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (batch, max_len) input ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.inference_mode()
def peft_generate(
    model, prompts: list[list[int]], adapters: list[int | None] | None, new_tokens: int, pad_id: int
) -> list[list[int]]:
    """Greedy batch generation, exactly `new_tokens` per row; `adapters=None` runs the plain model.

    Args:
        model: a PeftModel from `load_peft` (or a plain transformers model when `adapters` is None).
        prompts: prompt ids per row.
        adapters: adapter index per row (None in a row = the base), or None for no PEFT routing.
        new_tokens: tokens generated per row (min = max, so EOS never ends a row early).
        pad_id: the id used for left padding.
    """
    ids, mask = left_pad(prompts, pad_id)
    kwargs = {}
    if adapters is not None:
        kwargs["adapter_names"] = [BASE_NAME if a is None else adapter_name(a) for a in adapters]
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
        **kwargs,
    )
    return [row[ids.shape[1] :].tolist() for row in out]


def linear_layers(model) -> list[torch.nn.Module]:
    """Every linear layer a decode step runs, in execution order, plus lm_head last."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = []
    for block in base.model.layers:
        for name in LINEAR_MODULES:
            group = block.self_attn if hasattr(block.self_attn, name) else block.mlp
            layers.append(getattr(group, name))
    layers.append(base.lm_head)
    return layers


@torch.inference_mode()
def matmul_bound(model, batch: int, steps: int, quant: str) -> float:
    """Seconds for `steps` passes of a (batch, in) activation through every linear layer.

    The activation of each layer is a fresh (batch, in_features) tensor made up front, so only
    the matmuls are timed (no norms, attention, sampling or Python model code).
    """
    layers = linear_layers(model)
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    if quant == "nf4":
        calls = [(_nf4(layer) if layer is not layers[-1] else _plain(layer)) for layer in layers]
    else:
        calls = [_plain(layer) for layer in layers]
    inputs = [torch.randn(batch, layer.in_features, dtype=dtype) for layer in layers]  # (batch, in)
    for call, x in zip(calls, inputs):  # warm-up: first-call allocations, bnb kernel setup
        call(x)
    start = time.perf_counter()
    for _ in range(steps):
        for call, x in zip(calls, inputs):
            call(x)
    return time.perf_counter() - start


def bound_kind(quant: str, dtype: str) -> str:
    """How `matmul_bound` runs the projections, for the reports."""
    if quant == "nf4" and dtype == "bfloat16":
        return "the engine's NF4 kernel on AMX" if fused.amx_available() else "Linear4bit.forward"
    if quant == "nf4":
        return "the engine's NF4 kernel" if fused.enabled() else "Linear4bit.forward"
    if dtype == "bfloat16" and packed.supported(torch.device("cpu"), torch.bfloat16):
        return "oneDNN prepacked"
    return "the engine's float32 tile kernel" if fused.tile_kernels_available() else "F.linear"


def _nf4(layer):
    """The engine's NF4 kernel for a bitsandbytes layer (or a PEFT layer around one) loaded by
    `load_hf_model`, else the layer's own forward."""
    kernel = _NF4_KERNELS.get(getattr(layer, "base_layer", layer))
    return kernel.forward if kernel is not None else layer.forward


def _plain(layer):
    """The fastest dense kernel this machine has for the weight's dtype, as the engine runs it
    (server/engine/packed.py): oneDNN's prepacked layout for bf16 on a CPU that supports it, our
    tile kernel for float32 decode batches, else F.linear."""
    weight, bias = layer.weight.detach(), layer.bias
    if packed.supported(weight.device, weight.dtype):
        weight = packed.pack(weight)
    return lambda x: packed.linear(x, weight, bias)


def peft_load_times(model, adapter_dir: Path, repeats: int) -> list[float]:
    """Wall seconds of `load_adapter` for one adapter, `repeats` times (deleted after each)."""
    times = []
    for attempt in range(repeats):
        name = f"load-probe-{attempt}"
        start = time.perf_counter()
        model.load_adapter(str(adapter_dir), adapter_name=name)
        times.append(time.perf_counter() - start)
        model.delete_adapter(name)
    return times

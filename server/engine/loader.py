"""Build the engine's model from a Hugging Face directory: config -> `CausalLM`, safetensors -> weights.

Projections become `MultiLoraLinear` wrappers around either a plain `nn.Linear` (`quant="none"`) or a
bitsandbytes `Linear4bit` quantized to NF4 from the checkpoint's weights at load time, exactly as
transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` does (no double
quantization, uint8 storage; embeddings, norms and the LM head stay unquantized), through
`adapters.quant.nf4_linear`, the construction the trainer's QLoRA uses too. Only
safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from adapters.quant import DTYPES, nf4_linear
from server.engine import fused, packed
from server.engine.errors import UnsupportedModel
from server.engine.lora import MultiLoraLinear, slot_dtype
from server.engine.model import CausalLM, ModelSpec
from server.engine.nf4 import NF4Linear


def resolve_device_dtype(device: str, dtype: str, quant: str = "none") -> tuple[torch.device, torch.dtype]:
    """ "auto" dtype: bf16 on CUDA; on a CPU, bf16 for an NF4 base where its projections run on
    AMX (fused.nf4_amx_linear: 1.5x float32 activations' throughput at 16 concurrent), float32
    elsewhere (a CPU's bf16 without AMX is slower than float32 here)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        amx = device == "cpu" and quant == "nf4" and fused.amx_available()
        dtype = "bfloat16" if device == "cuda" or amx else "float32"
    return torch.device(device), DTYPES[dtype]


def read_generation_eos(model_dir: Path) -> frozenset[int]:
    """End-of-sequence ids from generation_config.json (preferred) or config.json."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                ids |= set(eos if isinstance(eos, list) else [eos])
                break
    return frozenset(int(i) for i in ids)


def _make_base_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str, dtype, device) -> nn.Module:
    out_features, in_features = weight.shape
    if quant == "none" and packed.supported(device, dtype):  # bf16 on a CPU: oneDNN's prepacked layout
        return packed.PackedLinear(weight.to(dtype), None if bias is None else bias.to(dtype))
    if quant == "none":
        layer = packed.DenseLinear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return layer
    layer = nf4_linear(weight, None if bias is None else bias.to(dtype), dtype, device).eval()
    if device.type == "cpu":
        # Our NF4 kernel, bitsandbytes' storage (nf4.py); it keeps the original NF4 blocks, which
        # bitsandbytes' first CPU forward repacks in place and fold needs to dequantize.
        return NF4Linear(layer)
    return layer


def load_model(
    model_dir: Path,
    quant: str,
    dtype: torch.dtype,
    device: torch.device,
    num_slots: int,
    max_rank: int,
    lora_dtype: str = "auto",
) -> CausalLM:
    """Args:
    model_dir: Hugging Face directory with config.json and *.safetensors.
    quant: "nf4" or "none".
    num_slots, max_rank: the adapter slot layout of every `MultiLoraLinear`.
    lora_dtype: `EngineConfig.lora_dtype` (what the slots store).
    """
    slots = slot_dtype(dtype, device, lora_dtype)
    model_dir = Path(model_dir)
    spec = ModelSpec.from_config(json.loads((model_dir / "config.json").read_text()))

    def make_linear(in_features: int, parts: list[tuple[str, int]], bias: bool) -> MultiLoraLinear:
        layer = MultiLoraLinear(nn.Identity(), in_features, parts, num_slots, max_rank, dtype, device, slots)
        layer.expects_bias = bias
        return layer

    with torch.device("meta"):
        model = CausalLM(spec, make_linear, dtype, "meta")
    tensors = _read_tensors(model_dir)
    # Embeddings and norms first: the projections' base layers are still empty placeholders.
    for name, _ in list(model.named_parameters()):
        if name not in tensors:
            raise UnsupportedModel(f"checkpoint has no tensor {name!r}")
        owner, _, attr = name.rpartition(".")
        setattr(
            model.get_submodule(owner),
            attr,
            nn.Parameter(tensors.pop(name).to(device=device, dtype=dtype), requires_grad=False),
        )
    for path, layer in model.lora_layers().items():
        parent = path.rpartition(".")[0]
        names = [f"{parent}.{part}" for part in layer.parts]
        missing = [n for n in names if f"{n}.weight" not in tensors]
        if missing:
            raise UnsupportedModel(f"checkpoint has no tensor {missing[0]}.weight")
        weight = torch.cat([tensors.pop(f"{n}.weight") for n in names])  # (sum of outs, in)
        biases = [tensors.pop(f"{n}.bias", None) for n in names]
        if any((b is not None) != layer.expects_bias for b in biases):
            raise UnsupportedModel(f"{path}: bias {'missing' if layer.expects_bias else 'unexpected'}")
        bias = torch.cat(biases) if layer.expects_bias else None
        layer.base = _make_base_linear(weight, bias, quant, dtype, device)
    head = tensors.pop("lm_head.weight", None)
    tied = spec.tie_word_embeddings or head is None
    head_weight = model.model.embed_tokens.weight if tied else head.to(device=device, dtype=dtype)
    if packed.supported(device, dtype):  # a tied head gets its own packed copy; embeddings stay dense
        head_weight = packed.pack(head_weight)
    model.lm_head_weight = head_weight
    return model.eval()


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{model_dir} has no *.safetensors weights")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def allocate_kv_cache(model: CausalLM, num_blocks: int, block_size: int) -> None:
    """Give every attention layer its K and V cache: (num_blocks * block_size, kv_heads, head_dim)."""
    spec = model.spec
    dtype = model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    for layer in model.model.layers:
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        layer.self_attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        layer.self_attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)


def kv_bytes_per_block(model: CausalLM, block_size: int) -> int:
    spec = model.spec
    itemsize = model.model.embed_tokens.weight.element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * itemsize

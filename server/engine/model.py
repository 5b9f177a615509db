"""A compact Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over the paged KV cache.

Module and parameter names mirror Hugging Face's (`model.layers.N.input_layernorm`, ...), except
that projections reading the same input with one output size are fused (`kv_proj`,
`gate_up_proj`: fewer, larger matmuls and one LoRA gather each); `lora_targets()` maps HF/PEFT projection paths to a fused
layer and its part. Every projection is a `MultiLoraLinear` wrapping the base layer. Activations are 2-D `(num_tokens, hidden)`: the step's
sequences are packed back to back, and `StepContext` (built once per step by the runner) carries
positions, rotary tables, paged-attention indices and LoRA routing to every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.engine import fused, packed
from server.engine.attention import AttnStep, paged_attention
from server.engine.errors import UnsupportedModel
from server.engine.lora import MultiLoraLinear, LoraStep


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts the model file needs, read from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config: dict) -> "ModelSpec":
        if config.get("model_type") not in ("llama", "mistral", "qwen2"):
            raise UnsupportedModel(f"model_type {config.get('model_type')!r} is not llama, mistral or qwen2")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"hidden_act {config['hidden_act']!r} is not silu")
        heads = int(config["num_attention_heads"])
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"rope type {rope_type!r} is not default, linear or llama3")
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama says so in attention_bias.
            attention_bias=config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        )


def rope_tables(spec: ModelSpec, max_len: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin, each (max_len, head_dim), as Hugging Face's default/linear/llama3 RoPE."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (L, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, D)
    half = dim // 2
    sin = emb.sin()
    # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]
    signed_sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    return emb.cos().to(dtype), signed_sin.to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class StepContext:
    cos: torch.Tensor  # (T, 1, head_dim)
    sin: torch.Tensor  # (T, 1, head_dim), signed
    attn: AttnStep
    lora: LoraStep | None


def apply_rope(x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """x (T, heads, D) rotated by each token's position (in place where fused.py can)."""
    return fused.rope(x, ctx.cos, ctx.sin)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype, device):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x + delta, rms_norm(x + delta))`: the residual add fused into the norm; the sum may
        be written into x (see fused.add_rms_norm)."""
        return fused.add_rms_norm(x, delta, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, make_linear):
        super().__init__()
        h, d, kv = spec.hidden_size, spec.head_dim, spec.num_kv_heads
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, kv, d
        self.q_size, self.kv_size = spec.num_heads * d, kv * d
        self.q_proj = make_linear(h, [("q_proj", self.q_size)], spec.attention_bias)
        # k and v read the same input and have one size: one fused projection (see MultiLoraLinear)
        self.kv_proj = make_linear(h, [("k_proj", self.kv_size), ("v_proj", self.kv_size)], spec.attention_bias)
        self.o_proj = make_linear(spec.num_heads * d, [("o_proj", h)], False)
        self.k_cache: torch.Tensor | None = None  # (num_blocks * block_size, kv_heads, head_dim)
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        T = x.shape[0]
        xs = MultiLoraLinear.group_input(x, ctx.lora)  # q and k/v read one x: gather it once
        q = self.q_proj(x, ctx.lora, xs).view(T, self.num_heads, self.head_dim)
        k, v = self.kv_proj(x, ctx.lora, xs).view(T, 2, self.num_kv_heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, ctx), apply_rope(k, ctx)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, ctx.attn)  # (T, H, D)
        return self.o_proj(out.reshape(T, -1), ctx.lora)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, make_linear):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.intermediate = i
        self.gate_up_proj = make_linear(h, [("gate_proj", i), ("up_proj", i)], spec.mlp_bias)
        self.down_proj = make_linear(i, [("down_proj", h)], spec.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, ctx.lora).split(self.intermediate, dim=-1)  # (T, I) each
        # (a native silu * up ran 3x slower than these two ops' vectorized, threaded kernels)
        return self.down_proj(F.silu(gate) * up, ctx.lora)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, make_linear, dtype, device):
        super().__init__()
        self.self_attn = Attention(spec, make_linear)
        self.mlp = MLP(spec, make_linear)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream before the previous layer's output `delta` is added (None for
        the first layer). Returns this layer's (residual stream, output to add): each add is fused
        into the norm that follows it."""
        x, h = self.input_layernorm(x, delta)
        x, h = self.post_attention_layernorm(x, self.self_attn(h, ctx))
        return x, self.mlp(h, ctx)


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, make_linear, dtype, device):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(spec, make_linear, dtype, device) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)


class CausalLM(nn.Module):
    """`forward(input_ids (T,), ctx, logit_rows (S,)) -> logits (S, vocab)` in float32."""

    def __init__(self, spec: ModelSpec, make_linear, dtype, device):
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec, make_linear, dtype, device)
        self.lm_head_weight: torch.Tensor | None = None  # set by the loader (tied or own; maybe packed.py's)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext, logit_rows: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.model.embed_tokens.weight)  # (T, hidden)
        delta = None
        for layer in self.model.layers:
            x, delta = layer(x, delta, ctx)
        assert delta is not None  # a model has layers
        # only rows that sample: add the last output and norm just those
        _, x = self.model.norm(x.index_select(0, logit_rows), delta.index_select(0, logit_rows))
        return packed.linear(x, self.lm_head_weight).float()

    def lora_layers(self) -> dict[str, MultiLoraLinear]:
        """Our module path (fused names like `...self_attn.kv_proj`) -> wrapped layer."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MultiLoraLinear)}

    def lora_targets(self) -> dict[str, tuple[MultiLoraLinear, str]]:
        """Hugging Face / PEFT module path (`...self_attn.q_proj`) -> (wrapped layer, part name)."""
        targets = {}
        for name, layer in self.lora_layers().items():
            parent = name.rpartition(".")[0]
            for part in layer.parts:
                targets[f"{parent}.{part}"] = (layer, part)
        return targets

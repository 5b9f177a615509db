"""The native step kernels against the eager ops they replace, one decode step's worth (issue 15).

`python -m bench.kernel_bench` builds random tensors of the base's shapes and times, interleaved
and best of `--rounds`:

- decode attention for `--batch` sequences of `--keys` keys in every layer, read through a paged
  block table (`fused.decode_attention`), against the eager gather + SDPA path
  (`attention._attend` with the kernels off), in bf16 and fp32;
- the multi-LoRA update of every projection (`fused.lora_sgmv`) for `--batch` tokens over
  `--adapters` adapters of rank `--rank`, with float32 slots and with bf16 slots
  (`EngineConfig.lora_dtype="bfloat16"`), each layer its own tensors so the slots stream from
  memory as they do in a step, against the eager grouped path (`MultiLoraLinear` with the
  kernels off, float32 slots);
- every projection as NF4 (random weights quantized by bitsandbytes, `adapters.quant.nf4_linear`)
  at batch `--batch`, at `fold.NF4_FOLD_MIN_ROWS` and at batch 1: the engine's NF4 kernel
  (`nf4.NF4Linear`, `fused.nf4_linear`) against bitsandbytes' own `Linear4bit` forward on the
  same storage, and against the prepacked bf16 dense copy a fold would run (the rows behind
  `NF4_FOLD_MIN_ROWS`: a fold pays only where `nf4_N_fold` is under `nf4_N`), and, on a CPU with
  AMX, the same projections with bf16 activations (`fused.nf4_amx_linear`). No LM head.

Writes `bench/results/kernels.json` (+ `.png`). These are the figures behind the engine README's
"Native kernels" section; step-level effects are `bench.step_bench`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters.base import resolve_base
from adapters.quant import nf4_linear
from bench.report import RESULTS_DIR, Measure, Report
from server.engine import attention, fused, packed
from server.engine.attention import build_attn_step
from server.engine.fold import NF4_FOLD_MIN_ROWS
from server.engine.lora import MultiLoraLinear, build_lora_step, dequantized_weight
from server.engine.model import ModelSpec
from server.engine.nf4 import NF4Linear


def attention_calls(spec: ModelSpec, batch: int, keys: int, dtype: torch.dtype) -> list[Callable[[], object]]:
    """One decode step's attention calls (one per layer), each layer its own KV cache."""
    block = 16
    per_seq = (keys + block - 1) // block
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(batch)]
    step = build_attn_step([(t, keys - 1, 1) for t in tables], block, batch, "cpu")
    assert step.decode is not None and step.decode.lengths is not None
    decode = step.decode
    calls: list[Callable[[], object]] = []
    for _ in range(spec.num_layers):
        shape = (batch * per_seq * block, spec.num_kv_heads, spec.head_dim)
        k, v = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        q = torch.randn(batch, spec.num_heads, spec.head_dim, dtype=dtype)
        calls.append(lambda q=q, k=k, v=v: attention._attend(q, k, v, decode))
    return calls


class _NoBase(torch.nn.Module):
    """A stand-in base layer whose output is zeros: only the LoRA update is timed."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.out_features)


def lora_layers(spec: ModelSpec, adapters: int, rank: int, slot_dtype: torch.dtype) -> list[MultiLoraLinear]:
    """Every projection of the base as a MultiLoraLinear (bf16 compute, no base weights) with
    `adapters` slots loaded at `rank`."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = [(h, [("q", q)]), (h, [("k", kv), ("v", kv)]), (q, [("o", h)]), (h, [("g", i), ("u", i)]), (i, [("d", h)])]
    layers = []
    for _ in range(spec.num_layers):
        for in_features, parts in shapes:
            out_features = sum(out for _, out in parts)
            layer = MultiLoraLinear(
                _NoBase(out_features), in_features, parts, adapters, rank, torch.bfloat16, "cpu", slot_dtype
            )
            for slot in range(1, adapters + 1):
                modules = {
                    name: (torch.randn(rank, in_features) * 0.02, torch.randn(rank, out) * 0.02, 2.0)
                    for name, out in parts
                }
                layer.load_slot(slot, modules)
            layers.append(layer)
    return layers


def nf4_layers(spec: ModelSpec) -> list[NF4Linear]:
    """Every projection of the base (fused as the engine fuses them) quantized to NF4 from random
    weights; each serves through the kernel, and its `.layer` is bitsandbytes' own."""
    h, i = spec.hidden_size, spec.intermediate_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = [(h, q), (h, 2 * kv), (q, h), (h, 2 * i), (i, h)]  # (in, out): q, k+v, o, gate+up, down
    return [
        NF4Linear(nf4_linear(torch.randn(out, in_features) * 0.05, None, torch.float32, "cpu").eval())
        for _ in range(spec.num_layers)
        for in_features, out in shapes
    ]


def best_of(rounds: int, runs: dict[str, Callable[[], None]]) -> dict[str, float]:
    """Best seconds of each run over `rounds` interleaved rounds (plus one warm-up round)."""
    best = {key: float("inf") for key in runs}
    for _ in range(rounds + 1):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_bench", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="default")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--keys", type=int, default=100, help="keys per sequence in the attention runs")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if not fused.enabled():
        print("native kernels unavailable (no C compiler?): nothing to compare", file=sys.stderr)
        return 1
    spec = ModelSpec.from_config(json.loads((resolve_base(args.base) / "config.json").read_text()))
    torch.manual_seed(0)

    def step(calls: list[Callable[[], object]], native: bool) -> Callable[[], None]:
        def run() -> None:
            fused.set_enabled(native)
            try:
                for call in calls:
                    call()
            finally:
                fused.set_enabled(True)

        return run

    runs: dict[str, Callable[[], None]] = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        calls = attention_calls(spec, args.batch, args.keys, dtype)
        runs[f"attention_{name}"] = step(calls, True)
        runs[f"attention_{name}_eager"] = step(calls, False)
    lora = build_lora_step([1 + t % args.adapters for t in range(args.batch)], 1, "cpu", torch.bfloat16)
    assert lora is not None and lora.segments is not None
    segments = lora.segments
    eager: list[Callable[[], object]] = []  # the grouped path: the update alone (a zero base)
    for slot_dtype, name in ((torch.float32, "fp32_slots"), (torch.bfloat16, "bf16_slots")):
        native: list[Callable[[], object]] = []
        for layer in lora_layers(spec, args.adapters, args.rank, slot_dtype):
            x = torch.randn(args.batch, layer.in_features, dtype=torch.bfloat16)
            y = torch.zeros(args.batch, layer.out_features, dtype=torch.bfloat16)
            weights = layer._native_weights
            assert weights is not None
            native.append(lambda y=y, x=x, w=weights: fused.lora_sgmv(y, x, w, segments))
            if slot_dtype == torch.float32:
                eager.append(lambda x=x, layer=layer: layer(x, lora))
        runs[f"lora_{name}"] = step(native, True)
    runs["lora_fp32_slots_eager"] = step(eager, False)
    projections = nf4_layers(spec)
    can_fold = packed.supported(torch.device("cpu"), torch.bfloat16)  # fold_dtype's bf16 copy
    folds = [packed.pack(dequantized_weight(m).to(torch.bfloat16)) for m in projections] if can_fold else []
    nf4_rows = sorted({args.batch, NF4_FOLD_MIN_ROWS, 1}, reverse=True)
    amx = fused.amx_available()  # bf16 activations: nf4_amx.c (the panels are built on first use)
    for rows in nf4_rows:
        inputs = [torch.randn(rows, layer.in_features) for layer in projections]
        runs[f"nf4_{rows}"] = step([lambda m=m, x=x: m(x) for m, x in zip(projections, inputs)], True)
        runs[f"nf4_{rows}_bnb"] = step([lambda m=m, x=x: m.layer(x) for m, x in zip(projections, inputs)], False)
        if can_fold:
            folded = [lambda w=w, x=x.bfloat16(): packed.linear(x, w).float() for w, x in zip(folds, inputs)]
            runs[f"nf4_{rows}_fold"] = step(folded, True)
        if amx:
            runs[f"nf4_{rows}_amx"] = step(
                [lambda m=m, x=x.bfloat16(): m(x) for m, x in zip(projections, inputs)], True
            )
    with torch.inference_mode():
        best = best_of(args.rounds, runs)
    report = Report(
        f"native kernels vs eager ops, one decode step of {spec.num_layers} layers: batch {args.batch}, "
        f"{args.keys} keys, {args.adapters} adapters of rank {args.rank}; best of {args.rounds} interleaved, "
        f"{torch.get_num_threads()} threads"
    )
    labels = {
        "attention_bf16": "decode attention, bf16, native",
        "attention_bf16_eager": "decode attention, bf16, eager gather + SDPA",
        "attention_fp32": "decode attention, fp32, native",
        "attention_fp32_eager": "decode attention, fp32, eager gather + SDPA",
        "lora_fp32_slots": "LoRA update, float32 slots, native",
        "lora_bf16_slots": "LoRA update, bf16 slots, native",
        "lora_fp32_slots_eager": "LoRA update, float32 slots, eager grouped path",
    }
    for rows in nf4_rows:
        labels[f"nf4_{rows}"] = f"NF4 projections, batch {rows}, native"
        labels[f"nf4_{rows}_bnb"] = f"NF4 projections, batch {rows}, bitsandbytes"
        if can_fold:
            labels[f"nf4_{rows}_fold"] = f"NF4 projections, batch {rows}, bf16 fold copy (prepacked)"
        if amx:
            labels[f"nf4_{rows}_amx"] = f"NF4 projections, batch {rows}, bf16 activations on AMX"
    for key, label in labels.items():
        report.add(Measure(key, label, 1000 * best[key], "ms", "a step's worth"))
    print(report.table())
    report.write("kernels", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Engine step cost vs number of active adapters, interleaved in one process (issue 15, item 1).

`python -m bench.step_bench --quant none` builds the engine once, then for each round runs the
same batch of `--requests` concurrent requests with no adapter and with 1, 4 and 8 adapters mixed
(fold off, so the LoRA path itself is measured), interleaved A,B,C,D,A,B,... so drifting machine
load hits every variant alike. A variant's decode step time is
`(t(long run) - t(short run)) / (long - short tokens)`: the difference cancels prefill and
admission. Prints ms/step per variant, the median over rounds, and the ratios to the base;
With `--compare-kernels` each variant also runs with the native kernels off
(server/engine/fused.py), interleaved the same way; with `--compare-lora-dtype` a second engine
with bf16 adapter slots (`EngineConfig.lora_dtype="bfloat16"`) runs the adapter variants too. Writes `bench/results/step_<quant>.json`
(+ `.png`) via the shared Report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from adapters.base import resolve_base
from bench import engine_runs
from bench.engine_bench import adapters_dir
from bench.report import RESULTS_DIR, Measure, Report
from bench.workload import chat_prompts, round_robin, write_adapters
from server.engine import fused
from server.engine.config import EngineConfig
from server.engine.engine import Engine

VARIANTS = (None, 1, 4, 8)


def decode_ms(engine: Engine, requests, refs, short: int, long: int) -> float:
    """Milliseconds per decode step (one token for every request), prefill cancelled out."""
    t_short = engine_runs.run_requests(engine, requests, refs, short).seconds
    t_long = engine_runs.run_requests(engine, requests, refs, long).seconds
    return 1000 * (t_long - t_short) / (long - short)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_bench", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="default")
    p.add_argument("--quant", choices=("none", "nf4"), default="none")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--long", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--compare-kernels",
        action="store_true",
        help="also run every variant with the native kernels off (server/engine/fused.py), interleaved",
    )
    p.add_argument(
        "--compare-lora-dtype",
        action="store_true",
        help="also run the adapter variants on an engine with bf16 adapter slots (--lora-dtype bfloat16)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    base_dir = resolve_base(args.base)
    prompts = chat_prompts(base_dir, args.requests)
    refs = engine_runs.refs_for(write_adapters(base_dir, adapters_dir(base_dir), max(v or 0 for v in VARIANTS)))
    lora_dtypes = ("auto", "bfloat16") if args.compare_lora_dtype else ("auto",)
    engines = {
        lora_dtype: Engine(
            EngineConfig(
                base=base_dir,
                quant=args.quant,
                dtype=args.dtype,
                device="cpu",
                max_loras=8,
                fold="off",
                lora_dtype=lora_dtype,
            )
        )
        for lora_dtype in lora_dtypes
    }
    workloads = {v: round_robin(prompts, v) for v in VARIANTS}
    kernels = (True, False) if args.compare_kernels and fused.enabled() else (fused.enabled(),)
    runs = [(v, k, "auto") for v in VARIANTS for k in kernels]
    runs += [(v, kernels[0], "bfloat16") for v in VARIANTS if v and "bfloat16" in engines]
    samples: dict[tuple[int | None, bool, str], list[float]] = {run: [] for run in runs}
    try:
        for v, _, lora_dtype in runs:  # warm-up: slots written, first-call allocations done
            engine_runs.run_requests(engines[lora_dtype], workloads[v], refs, 2)
        for r in range(args.rounds):
            for v, k, lora_dtype in runs:
                fused.set_enabled(k)
                ms = decode_ms(engines[lora_dtype], workloads[v], refs, args.short, args.long)
                samples[v, k, lora_dtype].append(ms)
            print(f"round {r}: " + ", ".join(f"{_key(*run)}:{samples[run][-1]:.1f}ms" for run in runs), flush=True)
    finally:
        fused.set_enabled(True)
        for engine in engines.values():
            engine.close()
    load = os.getloadavg()
    title = (
        f"step time vs active adapters: {base_dir.name}, quant={args.quant}, dtype={args.dtype}, "
        f"batch {args.requests}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds, "
        f"load {load[0]:.2f}"
    )
    report = Report(title, targets=[])
    base_ms = statistics.median(samples[None, kernels[0], "auto"])
    for v, k, lora_dtype in runs:
        ms = statistics.median(samples[v, k, lora_dtype])
        note = f"x{ms / base_ms:.2f} of base"
        if not k and len(kernels) == 2:
            note += f"; native kernels x{statistics.median(samples[v, True, 'auto']) / ms:.2f} of this"
        if lora_dtype != "auto":
            note += f"; x{ms / statistics.median(samples[v, k, 'auto']):.2f} of float32 slots"
        label = f"decode step, {v or 0} adapters" + ("" if k else ", eager ops (native kernels off)")
        label += ", bf16 slots" if lora_dtype != "auto" else ""
        report.add(Measure(_key(v, k, lora_dtype), label, ms, "ms", note))
    report.extra["samples_ms"] = {_key(*run): s for run, s in samples.items()}
    report.extra["loadavg"] = load
    print(report.table(), flush=True)
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"  # bf16 beside fp32, not over it
    json_path, png_path = report.write(f"step_{args.quant}{suffix}", args.out)
    print(f"wrote {json_path} and {png_path} at {time.strftime('%H:%M:%S')}")
    return 0


def _key(adapters: int | None, kernels: bool, lora_dtype: str = "auto") -> str:
    return f"step_{adapters or 0}" + ("" if kernels else "_eager") + ("" if lora_dtype == "auto" else "_lorabf16")


if __name__ == "__main__":
    sys.exit(main())

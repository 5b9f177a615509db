"""Where a benchmark run's time goes inside our engine: torch.profiler ops and cProfile functions.

`python -m bench.profile_engine --workload mixed` builds the engine, warms it up on the bench
workload (see workload.py), then runs it once under `torch.profiler` (operator self-times) and
once under `cProfile` (Python functions, cumulative), printing the top rows of each and writing
them to `bench/results/profile_<workload>_<quant>.txt`. It is a diagnosis aid for the engine's
authors; the figures it prints are not benchmark results (profiling slows everything down).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

from adapters.base import resolve_base
from bench import engine_runs
from bench.engine_bench import adapters_dir
from bench.report import RESULTS_DIR
from bench.workload import chat_prompts, round_robin, write_adapters

WORKLOADS = ("mixed", "base", "single", "many")


def build(args):
    base_dir = resolve_base(args.base)
    prompts = chat_prompts(base_dir, args.requests)
    count = args.many_adapters if args.workload == "many" else args.adapters
    dirs = write_adapters(base_dir, adapters_dir(base_dir), max(count, args.adapters))
    requests = {
        "mixed": round_robin(prompts, args.adapters),
        "base": round_robin(prompts, None),
        "single": round_robin(prompts, 1),
        "many": round_robin(prompts, args.many_adapters, count=args.many_adapters),
    }[args.workload]
    engine = engine_runs.make_engine(base_dir, args.quant, args.dtype)
    return engine, requests, engine_runs.refs_for(dirs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_engine", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="default")
    p.add_argument("--workload", choices=WORKLOADS, default="mixed")
    p.add_argument("--quant", choices=("none", "nf4"), default="none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--many-adapters", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, requests, refs = build(args)
    if args.workload == "single":
        engine.pin(refs[0])
    # warm-up: slots loaded; for "single", full length so the (sliced, cost-gated) fold is built
    engine_runs.run_requests(engine, requests, refs, args.new_tokens if args.workload == "single" else 2)
    steps_before = engine.num_steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run = engine_runs.run_requests(engine, requests, refs, args.new_tokens)
        seconds = time.perf_counter() - start
    steps = engine.num_steps - steps_before
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    profiler = cProfile.Profile()
    profiler.enable()
    engine_runs.run_requests(engine, requests, refs, args.new_tokens)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(args.top)
    engine.close()
    text = (
        f"workload={args.workload} quant={args.quant} threads={torch.get_num_threads()}: {run.tokens} tokens, "
        f"{steps} steps, {seconds:.2f}s under torch.profiler ({1000 * seconds / max(steps, 1):.1f} ms/step)\n\n"
        f"== torch.profiler, by self CPU time ==\n{ops}\n== cProfile, by cumulative time ==\n{stream.getvalue()}"
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.workload}_{args.quant}.txt"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine benchmark (issue 3, item 8): our engine next to transformers + PEFT and the matmul bound.

`python -m bench.engine_bench --quant none --dtype float32` (or `--quant nf4`) measures, in one
process on the same deterministic workload (see workload.py):

  (a) 16 concurrent requests over 8 rank-16 all-linear adapters through our engine
  (b) the same requests with no adapter          (c) transformers + PEFT mixed-batch generate
  (c0) transformers generate, base only          (d) the pure-matmul bound at the same batch size
  (e) cold adapter load disk -> slot (median), next to PEFT `load_adapter` (median)
  (f) one adapter's traffic, pinned and folded   (g) 64 distinct adapters over 8 slots

prints a table with the target ratios marked met / not met and writes
`bench/results/engine_<quant>.json` + `.png`. It also cross-checks greedy tokens: (a) against (c)
row by row, (f) and (g) against (a) where request and adapter coincide, and that adapters change
the output at all. A mismatch is printed as a warning, not a failure: the parity tests own that.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from adapters.base import BaseInfo, cache_dir, resolve_base
from bench import engine_runs, hf_baseline
from bench.report import RESULTS_DIR, Measure, Report, Target, median_ms
from bench.workload import chat_prompts, round_robin, write_adapters

TARGETS = [
    Target("mixed vs HF+PEFT", "a", 6.0, "c"),
    Target("mixed vs base", "a", 0.85, "b"),
    Target("mixed vs matmul bound", "a", 0.5, "d"),
    Target("cold load", "e", 50.0, kind="max"),
    Target("fold vs base", "f", 0.95, "b"),
    Target("fold on vs off, rotating adapters 1 at a time", "f_rot_on", 0.95, "f_rot_off"),
    Target("64 adapters vs 8", "g", 0.7, "a"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="default", help="'default' or a local HF directory")
    p.add_argument("--quant", choices=("none", "nf4"), default="none")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--requests", type=int, default=16, help="concurrent requests in (a), (b), (c), (f)")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters in (a) and (c)")
    p.add_argument("--many-adapters", type=int, default=64, help="distinct adapters (and requests) in (g)")
    p.add_argument("--slots", type=int, default=8, help="engine device slots (--max-loras)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--hf-new-tokens",
        type=int,
        default=None,
        help="tokens per row for (c)/(c0) if transformers is too slow (default: --new-tokens)",
    )
    p.add_argument("--load-repeats", type=int, default=5, help="samples for the (e) medians")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs per figure, the fastest kept (not (g), not cold loads); >1 on busy machines",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--skip-hf", action="store_true", help="skip (c), (c0), (d) and PEFT's (e)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.hf_new_tokens is None:
        args.hf_new_tokens = args.new_tokens
    if args.many_adapters < args.adapters + args.load_repeats and args.load_repeats:
        p.error("--many-adapters must be >= --adapters + --load-repeats (cold loads use unused adapters)")
    return args


def log(message: str) -> None:
    print(f"[engine_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_baselines(args, report: Report, base_dir: Path, dirs: list[Path], prompts, mixed) -> dict:
    """(c), (c0), (d) and PEFT's (e); returns the (c) outputs for the parity check."""
    dtype = getattr(torch, args.dtype)
    log("loading transformers + PEFT with the adapters")
    model = hf_baseline.load_hf_model(base_dir, args.quant, dtype)
    peft = hf_baseline.load_peft(model, dirs[: args.adapters])
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    rows, adapters = [list(r.prompt_ids) for r in mixed], [r.adapter for r in mixed]
    hf_note = (
        ""
        if args.hf_new_tokens == args.new_tokens
        else f"{args.hf_new_tokens} new tokens per row, not {args.new_tokens}"
    )
    hf_baseline.peft_generate(peft, rows, adapters, 1, pad)  # warm-up

    def fastest(fn):
        """(seconds, result) of the fastest of --repeats calls."""
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            timings.append((time.perf_counter() - start, result))
        return min(timings, key=lambda pair: pair[0])

    log(f"(c) PEFT mixed-batch generate, {args.hf_new_tokens} tokens per row")
    seconds, peft_out = fastest(lambda: hf_baseline.peft_generate(peft, rows, adapters, args.hf_new_tokens, pad))  # noqa: F821 - `del peft` below confuses ruff
    report.add(
        Measure("c", "transformers+PEFT mixed batch", len(rows) * args.hf_new_tokens / seconds, "tok/s", hf_note)
    )
    log("(c0) transformers generate, base only")
    with peft.disable_adapter():
        seconds, _ = fastest(lambda: hf_baseline.peft_generate(peft, rows, None, args.hf_new_tokens, pad))  # noqa: F821
    report.add(Measure("c0", "transformers base only", len(rows) * args.hf_new_tokens / seconds, "tok/s", hf_note))
    log("(d) matmul bound")
    seconds = min(hf_baseline.matmul_bound(peft, len(rows), args.new_tokens, args.quant) for _ in range(args.repeats))
    what = f"{hf_baseline.bound_kind(args.quant, args.dtype)} per layer"
    report.add(Measure("d", "matmul bound (linear weights only)", len(rows) * args.new_tokens / seconds, "tok/s", what))
    if args.load_repeats:
        log("(e) PEFT load_adapter")
        times = hf_baseline.peft_load_times(peft, dirs[args.adapters], args.load_repeats)
        report.add(Measure("e_peft", "PEFT load_adapter (median)", median_ms(times), "ms", f"n={len(times)}"))
    del peft, model
    gc.collect()
    return {"c": peft_out}


def measure_engine(args, report: Report, base_dir: Path, dirs: list[Path], workloads: dict) -> dict:
    """(a), (b), (f), (g) cold and warm, and the engine's (e); returns outputs for the checks."""
    log("loading our engine")
    engine = engine_runs.make_engine(
        base_dir, args.quant, args.dtype, max_loras=args.slots, max_cpu_loras=max(64, args.many_adapters)
    )
    refs = engine_runs.refs_for(dirs)
    outputs, n = {}, args.new_tokens
    try:
        for key, label, name in (
            ("a", f"engine, {args.adapters} adapters mixed", "mixed"),
            ("b", "engine, no adapter", "base"),
        ):
            log(f"({key}) {label}")
            run = engine_runs.warm_then_run(engine, workloads[name], refs, n, args.repeats)
            report.add(Measure(key, label, run.tok_s, "tok/s", f"{run.tokens} tokens in {run.seconds:.1f}s"))
            outputs[key] = run.outputs
            if key == "a":
                mixed_run = run
        # (d) counts decode steps only, (a) also the prompts' prefill: time a prefill-only pass
        # (max_tokens=1) to show (a)'s decode phase alone, for comparison with (d).
        prefill = min(
            (engine_runs.run_requests(engine, workloads["mixed"], refs, 1) for _ in range(args.repeats)),
            key=lambda r: r.seconds,
        )
        decode_tokens = mixed_run.tokens - prefill.tokens
        if decode_tokens > 0 and mixed_run.seconds > prefill.seconds:
            rate = decode_tokens / (mixed_run.seconds - prefill.seconds)
            report.add(
                Measure(
                    "a_dec",
                    "engine (a), decode phase only",
                    rate,
                    "tok/s",
                    f"derived: a prefill-only pass took {prefill.seconds:.1f}s",
                )
            )
        # (g) can run at most --slots sequences at once (one adapter each): the same engine with
        # that many base-only requests is (g)'s ceiling, so (g)/(b_slots) isolates the swap cost.
        log(f"(b_slots) engine, no adapter, {args.slots} concurrent requests")
        run = engine_runs.warm_then_run(engine, workloads["base"][: args.slots], refs, n, args.repeats)
        report.add(
            Measure(
                "b_slots",
                f"engine, no adapter, {args.slots} requests",
                run.tok_s,
                "tok/s",
                "(g)'s ceiling: one running sequence per slot",
            )
        )
        log("(f) engine, one adapter pinned (fold)")
        run = engine_runs.fold_run(engine, workloads["single"], refs, n, args.repeats)
        folded = run.stats.fold.folded == refs[0].id
        report.add(
            Measure("f", "engine, 1 adapter folded", run.tok_s, "tok/s", "folded" if folded else "WARNING: not folded")
        )
        outputs["f"] = run.outputs
        log(f"(f_rot) one request at a time over {args.adapters} rotating adapters, fold auto vs off")
        rotating = round_robin_one_each(workloads["mixed"], args.adapters)
        runs = engine_runs.rotating_fold_runs(engine, rotating, refs, n, args.repeats + 1)
        for key, mode in (("f_rot_on", "auto"), ("f_rot_off", "off")):
            report.add(
                Measure(
                    key,
                    f"engine, 1 at a time over rotating adapters, fold {mode}",
                    runs[mode].tok_s,
                    "tok/s",
                    f"{len(rotating)} requests, interleaved with the other mode",
                )
            )
        for key, label in (("g_cold", "1st pass"), ("g", "2nd pass")):
            log(f"({key}) engine, {args.many_adapters} adapters over {args.slots} slots, {label}")
            before = engine.stats()
            run = engine_runs.run_requests(engine, workloads["many"], refs, n)
            swaps = run.stats.slot_loads - before.slot_loads
            disk = run.stats.disk_loads - before.disk_loads
            report.add(
                Measure(
                    key,
                    f"engine, {args.many_adapters} adapters / {args.slots} slots, {label}",
                    run.tok_s,
                    "tok/s",
                    f"{swaps} slot writes, {disk} disk reads",
                )
            )
            outputs[key] = run.outputs
        if args.load_repeats:
            log("(e) engine cold load disk -> slot")
            unused = refs[args.adapters : args.adapters + args.load_repeats]
            times = [engine_runs.cold_load_seconds(engine, ref) for ref in unused]
            report.add(Measure("e", "engine cold load disk->slot (median)", median_ms(times), "ms", f"n={len(times)}"))
    finally:
        engine.close()
    return outputs


def round_robin_one_each(mixed, adapters: int):
    """One request per adapter (the first of each in `mixed`), in adapter order."""
    seen: dict = {}
    for r in mixed:
        seen.setdefault(r.adapter, r)
    return [seen[a] for a in sorted(k for k in seen if k is not None)][:adapters]


def first_difference(left: list[int], right: list[int]) -> int:
    """Index of the first token where two outputs differ (the shorter length if one is a prefix)."""
    return next((k for k, (x, y) in enumerate(zip(left, right)) if x != y), min(len(left), len(right)))


def cross_check(report: Report, outputs: dict, workloads: dict, hf_tokens: int) -> None:
    """Greedy-token agreements, recorded as notes (and printed as warnings when they fail)."""
    checks = []

    def compare(name: str, left: str, right: str, pairs: list[tuple[int, int]], width: int | None = None):
        if left not in outputs or right not in outputs:
            return
        same = sum(outputs[left][i][:width] == outputs[right][j][:width] for i, j in pairs)
        # Where each disagreeing row first differs: late divergence is a float near-tie, early is a bug.
        first = [
            first_difference(outputs[left][i][:width], outputs[right][j][:width])
            for i, j in pairs
            if outputs[left][i][:width] != outputs[right][j][:width]
        ]
        checks.append((name, same, len(pairs), first))

    n = len(workloads["mixed"])
    compare(f"(a) equals (c), first {hf_tokens} tokens", "a", "c", [(i, i) for i in range(n)], hf_tokens)
    single = [i for i, r in enumerate(workloads["mixed"]) if r.adapter == 0]
    compare("(f) folded equals (a) unfolded, adapter 0", "f", "a", [(i, i) for i in single])
    many = [(i, i) for i, r in enumerate(workloads["many"]) if i < n and r.adapter == workloads["mixed"][i].adapter]
    compare("(g) equals (a) where prompt and adapter coincide", "g", "a", many)
    if "a" in outputs and "b" in outputs:
        differ = sum(outputs["a"][i] != outputs["b"][i] for i in range(n))
        report.notes.append(f"adapters change the output: {differ}/{n} rows of (a) differ from (b)")
    for name, same, total, first in checks:
        where = f" (others first differ at token {sorted(first)})" if first else ""
        report.notes.append(f"{name}: {same}/{total} rows{where}")
        if same != total:
            print(f"WARNING: {name}: only {same}/{total} rows agree{where}", file=sys.stderr)
    report.extra["checks"] = [
        {"check": name, "agree": same, "total": total, "first_difference": first} for name, same, total, first in checks
    ]


def adapters_dir(base_dir: Path) -> Path:
    info = BaseInfo.from_dir(base_dir)
    return cache_dir() / "bench-adapters" / f"{base_dir.name}-{info.fingerprint[:12]}"


def run(args: argparse.Namespace) -> Report:
    if args.threads:
        torch.set_num_threads(args.threads)
    base_dir = resolve_base(args.base)
    log(f"workload: {args.requests} prompts, {args.many_adapters} adapters under {adapters_dir(base_dir)}")
    prompts = chat_prompts(base_dir, args.requests)
    dirs = write_adapters(base_dir, adapters_dir(base_dir), args.many_adapters)
    workloads = {
        "mixed": round_robin(prompts, args.adapters),
        "base": round_robin(prompts, None),
        "single": round_robin(prompts, 1),
        "many": round_robin(prompts, args.many_adapters, count=args.many_adapters),
    }
    title = (
        f"loraswap engine benchmark: {base_dir.name}, quant={args.quant}, dtype={args.dtype}, "
        f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens/request"
        + (f", fastest of {args.repeats}" if args.repeats > 1 else "")
    )
    report = Report(title, targets=list(TARGETS))
    report.extra["args"] = {k: str(v) for k, v in vars(args).items()}
    outputs = {}
    if not args.skip_hf:
        outputs.update(measure_baselines(args, report, base_dir, dirs, prompts, workloads["mixed"]))
    outputs.update(measure_engine(args, report, base_dir, dirs, workloads))
    cross_check(report, outputs, workloads, args.hf_new_tokens)
    short = [key for key, out in outputs.items() if key != "c" and any(len(o) != args.new_tokens for o in out)]
    if short:
        report.notes.append(f"WARNING: runs {short} produced a different token count than {args.new_tokens}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(report.table(), flush=True)
    # the dense bf16 path (issue 15) writes beside the fp32 one instead of over it
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    json_path, png_path = report.write(f"engine_{args.quant}{suffix}", args.out)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

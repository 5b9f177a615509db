"""Where the HTTP path's time goes: a real `loraswap serve` under streaming and plain load (diagnosis).

`python -m bench.profile_http [--quant nf4] [--concurrency 16] [--cprofile]`. Starts the server,
runs a warm-up, then waves of `--concurrency` streaming and non-streaming base requests, and reads
each server thread's CPU time from /proc before and after: the event loop is the main thread, the
engine loop the busiest other Python thread; torch's intra-op workers are the rest. The figure of
interest is the event loop's CPU milliseconds per generated token (what HTTP costs on top of the
engine); `load_generator` is this process's own CPU per token (it shares the machine's cores). With `--cprofile`, the server runs under a wrapper (`--child`) that profiles the event
loop thread and the engine thread separately and prints the top functions of each on exit.
This is for finding costs, not for figures of record (`bench.http_sweep` is).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from adapters.base import resolve_base
from bench.http_load import chat_body, run_wave
from bench.serve_process import ServeProcess
from bench.workload import QUESTIONS

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of `pid`, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return out


def split_cpu(pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """CPU seconds spent between two snapshots: event loop (main), engine (busiest other), rest."""
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    loop = spent.pop(pid, 0.0)
    engine_tid = max(spent, key=lambda t: spent[t], default=None)
    engine = spent.pop(engine_tid, 0.0) if engine_tid is not None else 0.0
    return {"event_loop": loop, "busiest_other": engine, "rest": sum(spent.values())}


def profile_child(prefix: str, argv: list[str]) -> int:
    """In the server process: cProfile the event loop (main thread) and the engine thread."""
    import cProfile
    import pstats

    from server.engine import engine as engine_module

    original = engine_module.Engine._loop

    def profiled_loop(self) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()
            profile.dump_stats(f"{prefix}.engine.prof")

    engine_module.Engine._loop = profiled_loop  # type: ignore[method-assign]
    loop_profile = cProfile.Profile()
    original_start = engine_module.Engine.start

    async def profiled_start(self) -> None:
        loop_profile.enable()  # from the lifespan on: serving, not loading the model
        await original_start(self)

    engine_module.Engine.start = profiled_start  # type: ignore[method-assign]
    from loraswap.cli import main as cli_main

    # uvicorn re-raises the SIGTERM it caught once it has shut down; ignore that one so the
    # profiles below are still written.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        code = cli_main(argv)
    finally:
        loop_profile.disable()
        loop_profile.dump_stats(f"{prefix}.loop.prof")
    for which in ("loop", "engine"):
        path = f"{prefix}.{which}.prof"
        if os.path.exists(path):
            print(f"\n===== {which} thread, by own time", file=sys.stderr)
            pstats.Stats(path, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return code


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile_http")
    p.add_argument("--base", default="default")
    p.add_argument("--quant", choices=("none", "nf4"), default="nf4")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--waves", type=int, default=2, help="streaming and plain waves, alternated")
    p.add_argument("--cprofile", action="store_true", help="profile the server's threads (prints on exit)")
    p.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="another source tree (e.g. `git worktree add /tmp/before main`): run its server too and "
        "alternate waves between the two (A,B,A,B), so machine load hits both alike",
    )
    return p.parse_args(argv)


def wave(server: ServeProcess, args, stream: bool) -> tuple[float, dict[str, float]]:
    """One wave of `--concurrency` base requests: (tok/s, CPU ms per token by thread group)."""
    model = httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.concurrency)]
    bodies = [chat_body(model, q, args.new_tokens, stream) for q in questions]
    before = thread_cpu(server.pid)
    client_before = time.process_time()
    result = asyncio.run(run_wave(server.url, bodies, args.concurrency))
    cpu = split_cpu(server.pid, before, thread_cpu(server.pid))
    # The load generator shares the two cores with the server: its own CPU is a cost of the
    # measurement, not of the server, and is shown so that the two are not confused.
    cpu["load_generator"] = time.process_time() - client_before
    return result.tok_s, {k: 1000 * v / max(1, result.tokens) for k, v in cpu.items()}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return profile_child(argv[1], argv[2:])
    args = parse_args(argv)
    base_dir = resolve_base(args.base)
    flags = {"--quant": args.quant, "--dtype": args.dtype, "--device": "cpu", "--max-loras": "0"}
    flags["--max-concurrent-per-tenant"] = flags["--max-num-seqs"] = str(max(16, args.concurrency))
    trees = {"this": None} if args.compare is None else {"this": None, "other": args.compare.resolve()}
    rows: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="profile-http-") as tmp:
        servers = {}
        for name, tree in trees.items():
            python = None
            if args.cprofile:
                python = [sys.executable, "-m", "bench.profile_http", "--child", f"{tmp}/{name}"]
            log_path = Path(tmp) / f"{name}.log"
            servers[name] = ServeProcess(base_dir, Path(tmp) / f"{name}-store", log_path, flags, python, tree)
        try:
            for server in servers.values():
                server.start()
                wave(server, args, True)  # warm-up
            for _ in range(args.waves):
                for stream in (True, False):
                    for name, server in servers.items():
                        tok_s, per_token = wave(server, args, stream)
                        rows.setdefault((name, stream), []).append((tok_s, per_token["event_loop"]))
                        shown = ", ".join(f"{k} {v:.2f}" for k, v in per_token.items())
                        kind = "streamed" if stream else "plain"
                        print(
                            f"{name:>5} {kind:>8} x{args.concurrency}: {tok_s:6.1f} tok/s; CPU ms/token: {shown}; "
                            f"load {os.getloadavg()[0]:.2f}",
                            flush=True,
                        )
        finally:
            for server in servers.values():
                server.stop()
        if args.cprofile:
            for server in servers.values():
                print(server.log_tail(120), file=sys.stderr)
    for (name, stream), values in sorted(rows.items()):
        tok_s = statistics.median(v[0] for v in values)
        loop_ms = statistics.median(v[1] for v in values)
        kind = "streamed" if stream else "plain"
        print(f"median {name:>5} {kind:>8}: {tok_s:6.1f} tok/s, event loop {loop_ms:.3f} CPU ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())

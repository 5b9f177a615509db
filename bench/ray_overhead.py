"""The Ray Serve path's overhead over the single-process server, measured in one run on one machine.

Starts `loraswap serve` (one process) and `loraswap serve --replicas N` (Ray Serve) on two ports
with the same flags, then for each: the latency of one chat request (median of `--repeats`) and the
throughput of 16 concurrent requests (completion tokens / wall time). Greedy, `min_tokens` =
`max_tokens` so every request generates the same count. Prints a table and writes JSON + PNG.
Figures only mean something on a quiet machine; with N replicas on one CPU the engines share cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.report import RESULTS_DIR, Measure, Report


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(extra: list[str], port: int, store: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "loraswap.cli", "serve", "--port", str(port), "--store", str(store), *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(url: str, tokens: int, repeats: int, concurrent: int) -> tuple[float, float]:
    """(median single-request latency in ms, tok/s of `concurrent` requests at once)."""
    with httpx.Client(base_url=url, timeout=600) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me about Paris."}],
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }

        def one(_=None) -> int:
            response = http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        one()  # warm-up
        latencies = []
        for _ in range(repeats):
            start = time.perf_counter()
            one()
            latencies.append(time.perf_counter() - start)
        with ThreadPoolExecutor(concurrent) as pool:
            start = time.perf_counter()
            total = sum(pool.map(one, range(concurrent)))
            wall = time.perf_counter() - start
    return 1000 * statistics.median(latencies), total / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--serve-args", default="", help="extra `loraswap serve` flags for both, e.g. '--base DIR'")
    parser.add_argument("--store", type=Path, default=Path("/tmp/loraswap-ray-overhead"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    extra = args.serve_args.split()
    report = Report(
        f"Ray Serve path vs single process ({args.replicas} replicas, {args.tokens} tokens, "
        f"{args.concurrent} concurrent)"
    )
    for label, flags in (("single", []), ("ray", ["--replicas", str(args.replicas)])):
        port = _port()
        proc = _start(extra + flags, port, args.store / label)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc, 600)
            latency, throughput = measure(f"http://127.0.0.1:{port}", args.tokens, args.repeats, args.concurrent)
        finally:
            _stop(proc)
        report.add(Measure(f"{label}_lat", f"{label}: one request", latency, "ms"))
        report.add(Measure(f"{label}_tput", f"{label}: {args.concurrent} concurrent", throughput, "tok/s"))
    values = report.values()
    report.notes.append(
        f"latency overhead {values['ray_lat'] / values['single_lat']:.2f}x, "
        f"throughput ratio {values['ray_tput'] / values['single_tput']:.2f}x"
    )
    print(report.table())
    report.write("ray_overhead", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Ray Serve path's overhead over the single-process server, measured in one run on one machine.

Starts `loraswap serve` (one process) and `loraswap serve --replicas N` (Ray Serve) on two ports
with the same flags, both at once, then measures them interleaved (single, ray, single, ray, ... for
`--rounds` rounds, so a load change on a shared machine hits both alike): the latency of one chat
request and the throughput of 16 concurrent requests (completion tokens / wall time), each the
median over the rounds. Greedy, `min_tokens` = `max_tokens` so every request generates the same
count. Prints a table (with the load average) and writes JSON + PNG. `make bench-ray` runs it; it is
not part of `make bench` (starting Ray costs a minute and several hundred MB per replica). Figures
only mean something on a quiet machine; with N replicas on one CPU the engines share its cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.report import RESULTS_DIR, Measure, Report
from loraswap.serve_process import ServeProcess


class Target:
    """One running server and the request every measurement sends it."""

    def __init__(self, url: str, tokens: int):
        self.http = httpx.Client(base_url=url, timeout=600)
        model = self.http.get("/v1/models").json()["data"][0]["id"]
        self.body = {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me about Paris."}],
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }
        self.one()  # warm-up

    def one(self, _=None) -> int:
        response = self.http.post("/v1/chat/completions", json=self.body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    def latency_ms(self) -> float:
        start = time.perf_counter()
        self.one()
        return 1000 * (time.perf_counter() - start)

    def throughput(self, concurrent: int) -> float:
        """Completion tokens per second of `concurrent` requests sent at once."""
        with ThreadPoolExecutor(concurrent) as pool:
            start = time.perf_counter()
            total = sum(pool.map(self.one, range(concurrent)))
            return total / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (single, ray) per figure")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--serve-args", default="", help="extra `loraswap serve` flags for both, e.g. '--base DIR'")
    parser.add_argument("--store", type=Path, default=Path("/tmp/loraswap-ray-overhead"))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    extra = args.serve_args.split()
    report = Report(
        f"Ray Serve path vs single process ({args.replicas} replicas, {args.tokens} tokens, "
        f"{args.concurrent} concurrent, {args.rounds} interleaved rounds)"
    )
    variants = {"single": [], "ray": ["--replicas", str(args.replicas)]}
    servers = {
        label: ServeProcess(None, args.store / label, args.store / f"{label}.log", extra + flags, ready_timeout=900)
        for label, flags in variants.items()
    }
    try:
        for server in servers.values():  # both start at once: Ray's start-up overlaps the other's
            server.launch()
        for server in servers.values():
            server.wait_ready()
        targets = {label: Target(server.url, args.tokens) for label, server in servers.items()}
        latency: dict[str, list[float]] = {label: [] for label in variants}
        throughput: dict[str, list[float]] = {label: [] for label in variants}
        for _ in range(args.rounds):
            for label, target in targets.items():
                latency[label].append(target.latency_ms())
            for label, target in targets.items():
                throughput[label].append(target.throughput(args.concurrent))
        for target in targets.values():
            target.http.close()
    finally:
        for server in servers.values():
            server.stop()
    for label in variants:
        report.add(Measure(f"{label}_lat", f"{label}: one request", statistics.median(latency[label]), "ms"))
        report.add(
            Measure(
                f"{label}_tput", f"{label}: {args.concurrent} concurrent", statistics.median(throughput[label]), "tok/s"
            )
        )
    report.notes.append(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
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

"""This machine's float32 multiply-add peak, the ceiling of any compute-bound step (issue 15).

`python -m bench.fma_peak` compiles a loop of independent 16-lane fused multiply-adds (twelve
accumulators, enough to hide the FMA latency) with the system C compiler, the engine's flags
(`-O2 -march=native -fopenmp`), and times it on one thread and on every thread torch uses. At
batch 16 a decode step's projections are compute-bound, so this peak, not memory bandwidth,
bounds them: `2 * params * batch / peak` seconds. Writes `bench/results/fma_peak.json`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.report import RESULTS_DIR, Measure, Report

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
typedef float v16 __attribute__((vector_size(64)));
int main(int argc, char **argv) {
    int threads = atoi(argv[1]);
    long iters = atol(argv[2]);
    double t0 = omp_get_wtime();
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        v16 b, c, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11;
        for (int i = 0; i < 16; i++) {
            b[i] = 1.0000001f, c[i] = 1e-9f;
            a0[i] = 0, a1[i] = 1, a2[i] = 2, a3[i] = 3, a4[i] = 4, a5[i] = 5;
            a6[i] = 6, a7[i] = 7, a8[i] = 8, a9[i] = 9, a10[i] = 10, a11[i] = 11;
        }
        for (long k = 0; k < iters; k++) {
            a0 = a0 * b + c, a1 = a1 * b + c, a2 = a2 * b + c, a3 = a3 * b + c;
            a4 = a4 * b + c, a5 = a5 * b + c, a6 = a6 * b + c, a7 = a7 * b + c;
            a8 = a8 * b + c, a9 = a9 * b + c, a10 = a10 * b + c, a11 = a11 * b + c;
        }
        v16 s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
        for (int i = 0; i < 16; i++) sink += s[i];
    }
    double seconds = omp_get_wtime() - t0;
    printf("%.3f %g\n", threads * (double)iters * 12 * 16 * 2 / seconds / 1e9, sink);
    return 0;
}
"""


def peak_gflops(binary: Path, threads: int, iters: int, repeats: int) -> float:
    """Best GFLOPS of `repeats` runs of the loop on `threads` threads."""
    best = 0.0
    for _ in range(repeats):
        out = subprocess.run([str(binary), str(threads), str(iters)], capture_output=True, text=True, check=True)
        best = max(best, float(out.stdout.split()[0]))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fma_peak", description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=50_000_000, help="loop trips per thread")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    compiler = shutil.which("cc")
    if compiler is None:
        print("no C compiler: nothing to measure", file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    report = Report(f"float32 FMA peak, 16-lane vectors, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "fma.c", Path(tmp) / "fma"
        source.write_text(SOURCE)
        flags = ["-O2", "-march=native", "-ffp-contract=fast", "-fopenmp"]
        subprocess.run([compiler, *flags, "-o", str(binary), str(source)], check=True)
        for n in sorted({1, threads}):
            gflops = peak_gflops(binary, n, args.iters, args.repeats)
            report.add(Measure(f"fma@{n}", f"FMA peak, {n} thread(s)", gflops, "GFLOPS"))
    print(report.table())
    report.write("fma_peak", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

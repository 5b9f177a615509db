"""`make bench`: the engine benchmark and the HTTP sweep in fp32, NF4 and bf16, structured outputs, the trainer.

Each benchmark runs in its own child process (`python -m bench.<name> ...`), so one's memory and
thread state never colours the next one's figures, and one failing does not hide the others.
Extra arguments are passed to every engine run (e.g. `python -m bench.run_all --threads 2`); the
HTTP sweep (`bench.http_sweep`, a real `loraswap serve` child) takes none of them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ENGINE_RUNS = (["--quant", "none", "--dtype", "float32"], ["--quant", "nf4"])
# issue 15: the dense bf16 path (AMX/AVX512-BF16 GEMMs); engine figures only, the HF baselines are fp32
BF16_RUN = ["--quant", "none", "--dtype", "bfloat16"]
# NF4 with bf16 activations: the projections on AMX where the CPU has it (server/engine/native/nf4_amx.c);
# what `--dtype auto` (the default) serves an NF4 base with on such a CPU
NF4_BF16_RUN = ["--quant", "nf4", "--dtype", "bfloat16"]


def plan(extra: list[str]) -> list[list[str]]:
    """The child commands, in order."""
    commands = [[sys.executable, "-m", "bench.engine_bench", *flags, *extra] for flags in ENGINE_RUNS]
    commands += [
        [sys.executable, "-m", "bench.engine_bench", *flags, "--skip-hf", *extra] for flags in (BF16_RUN, NF4_BF16_RUN)
    ]
    commands += [  # issue 15: step vs adapters, with the native kernels (fused.py) and without
        [sys.executable, "-m", "bench.step_bench", *flags, "--compare-kernels"] for flags in ENGINE_RUNS
    ]  # bf16 also against bf16 adapter slots (--lora-dtype bfloat16)
    commands.append([sys.executable, "-m", "bench.step_bench", *BF16_RUN, "--compare-kernels", "--compare-lora-dtype"])
    commands += [[sys.executable, "-m", "bench.http_sweep", *flags] for flags in (*ENGINE_RUNS, BF16_RUN, NF4_BF16_RUN)]
    commands.append([sys.executable, "-m", "bench.http_sweep", *BF16_RUN, "--lora-dtype", "bfloat16"])
    commands.append([sys.executable, "-m", "bench.gemm_bench"])  # issue 15: the kernels behind packed.py
    commands.append([sys.executable, "-m", "bench.fma_peak"])  # issue 15: the compute ceiling of batch-16 steps
    commands.append([sys.executable, "-m", "bench.kernel_bench"])  # issue 15: fused.py's kernels vs eager ops
    commands.append([sys.executable, "-m", "bench.structured_bench", *extra])  # issue 10: constrained batch
    commands.append([sys.executable, "-m", "bench.prefix_bench", *extra])  # issue 13: prefix cache, n=4
    if (BENCH_DIR / "train_bench.py").is_file():
        commands.append([sys.executable, "-m", "bench.train_bench"])
    return commands


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    failures = []
    for command in plan(extra):
        shown = " ".join(command[1:])
        print(f"\n=== python {shown}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=BENCH_DIR.parent)
        print(f"=== exit {code} after {time.perf_counter() - start:.0f}s", flush=True)
        if code != 0:
            failures.append(shown)
    if failures:
        print(f"\nfailed: {'; '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

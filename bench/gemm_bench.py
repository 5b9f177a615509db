"""Every linear of the base, one decode step's worth, by kernel and batch size (issue 15).

`python -m bench.gemm_bench` times the base's projections (each layer's q, k, v, o, gate, up,
down, then the LM head; random weights of the base's shapes, each its own tensor so nothing
stays in cache) for batch 1 to 64 with four kernels, interleaved and best of `--rounds`: fp32
`F.linear`, our fp32 tile kernel (`fused.dense_linear`, what the engine runs for float32 decode
batches), bf16 `F.linear`, and bf16 against oneDNN-prepacked weights (server/engine/packed.py,
what the engine runs for `--quant none --dtype bfloat16`). It is the measurement behind
packed.py's choices (pack bf16, not fp32; the tile kernel up to `DENSE_KERNEL_MAX_ROWS` rows);
writes `bench/results/gemm.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.base import resolve_base
from bench.report import RESULTS_DIR, Measure, Report
from server.engine import fused, packed
from server.engine.model import ModelSpec

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """(out, in) of every linear a decode step runs, in order."""
    h, i, q, kv = (
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_heads * spec.head_dim,
        spec.num_kv_heads * spec.head_dim,
    )
    layer = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    return layer * spec.num_layers + [(spec.vocab_size, h)]


def kernels() -> dict[str, tuple[torch.dtype, Callable[..., torch.Tensor]]]:
    found = {"fp32 F.linear": (torch.float32, F.linear), "bf16 F.linear": (torch.bfloat16, F.linear)}
    if fused.tile_kernels_available():
        found["fp32 tile kernel"] = (torch.float32, fused.dense_linear)
    if packed.supported(torch.device("cpu"), torch.bfloat16):
        found["bf16 prepacked"] = (torch.bfloat16, packed.linear)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gemm_bench", description=__doc__.split("\n")[0])
    p.add_argument("--base", default="default")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    spec = ModelSpec.from_config(json.loads((resolve_base(args.base) / "config.json").read_text()))
    torch.manual_seed(0)
    runs = {}  # (kernel, batch) -> list of calls
    for name, (dtype, linear) in kernels().items():
        weights = [torch.randn(out, inp, dtype=dtype) for out, inp in shapes(spec)]
        if linear is packed.linear:
            weights = [packed.pack(w) for w in weights]
        for batch in BATCHES:
            inputs = [torch.randn(batch, w.shape[1], dtype=dtype) for w in weights]
            runs[name, batch] = [(linear, w, x) for w, x in zip(weights, inputs)]
    best = {key: float("inf") for key in runs}
    with torch.inference_mode():
        for _ in range(args.rounds + 1):  # the first round warms up and is kept only if fastest
            for key, calls in runs.items():
                start = time.perf_counter()
                for linear, w, x in calls:
                    linear(x, w)
                best[key] = min(best[key], time.perf_counter() - start)
    report = Report(
        f"all linears of {spec.num_layers} layers + LM head, best of {args.rounds} interleaved, {torch.get_num_threads()} threads"
    )
    for (name, batch), seconds in best.items():
        report.add(Measure(f"{name.replace(' ', '_')}@{batch}", f"{name}, batch {batch}", 1000 * seconds, "ms"))
    print(report.table())
    report.write("gemm", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

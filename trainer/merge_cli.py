"""`loraswap merge`: combine PEFT adapter directories into a new one with `adapters.merge`.

Reads each `--adapter DIR[:WEIGHT]` (config, safetensors and, when present, `loraswap.json`),
calls `merge_adapters`, writes the result as a PEFT directory with its provenance through a
staging directory renamed into place, and prints the per-module SVD error summary. All the
merging logic lives in `adapters/merge.py`; this file only parses, reads, writes and prints.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from adapters.errors import AdapterError
from adapters.format import read_peft, write_peft
from adapters.merge import DEFAULT_MAX_RANK, METHODS, MergeInput, MergeResult, merge_adapters
from adapters.provenance import read_provenance


class CliError(Exception):
    """A problem with the command line's inputs or output, reported without a traceback."""


def parse_adapter_spec(spec: str) -> tuple[Path, float]:
    """`DIR` or `DIR:WEIGHT` -> (directory, weight). A suffix that is not a number is part of DIR."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def read_input(spec: str) -> MergeInput:
    directory, weight = parse_adapter_spec(spec)
    if not directory.is_dir():
        raise CliError(f"adapter directory {directory} does not exist")
    try:
        weights = read_peft(directory)
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read adapter {directory}: {exc}") from exc
    return MergeInput(weights=weights, weight=weight, provenance=read_provenance(directory), name=directory.name)


def write_output(result: MergeResult, out: Path) -> None:
    """Stage the directory beside `out` and rename it into place, so `out` is never half-written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"output {out} already exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_peft(result.weights, staging, result.provenance)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def summary(result: MergeResult, worst: int = 5) -> str:
    """Ranks, then the SVD step's relative Frobenius error overall, per projection and worst modules."""
    ranks = sorted({m.rank for m in result.weights.modules.values()})
    lines = [f"{len(result.weights.modules)} modules, rank {'/'.join(map(str, ranks))}"]
    errors = result.svd_errors
    if not errors:
        lines.append("exact (cat): no SVD step")
        return "\n".join(lines)
    values = list(errors.values())
    lines.append(f"SVD relative Frobenius error: mean {sum(values) / len(values):.3e}, max {max(values):.3e}")
    by_projection = defaultdict(list)
    for path, error in errors.items():
        by_projection[path.rsplit(".", 1)[-1]].append(error)
    for projection, errs in sorted(by_projection.items()):
        lines.append(f"  {projection:<10} mean {sum(errs) / len(errs):.3e}  max {max(errs):.3e}")
    lines.append("worst modules:")
    for path, error in sorted(errors.items(), key=lambda item: -item[1])[:worst]:
        lines.append(f"  {path:<40} {error:.3e}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraswap merge", description="Merge LoRA adapters into one.")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="DIR[:WEIGHT]",
        help="a PEFT adapter directory and its weight (default 1.0); repeat for each input",
    )
    parser.add_argument("--out", required=True, type=Path, help="new directory for the merged adapter")
    parser.add_argument("--density", type=float, default=0.5, help="fraction kept by ties / dare_* (0, 1]")
    parser.add_argument("--rank", type=int, default=None, help="merged rank (default: sum of input ranks)")
    parser.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK, help="largest rank allowed")
    parser.add_argument("--seed", type=int, default=0, help="seed for dare_* random drops")
    return parser


def main(argv: list[str]) -> int:
    """Run `loraswap merge`; returns 0 on success, 1 when the merge is refused or fails."""
    args = build_parser().parse_args(argv)
    try:
        inputs = [read_input(spec) for spec in args.adapter]
        result = merge_adapters(
            inputs, args.method, density=args.density, rank=args.rank, seed=args.seed, max_rank=args.max_rank
        )
        write_output(result, args.out)
    except (CliError, AdapterError) as exc:  # MergeError and bad loraswap.json
        print(f"loraswap merge: error: {exc}", file=sys.stderr)
        return 1
    weights = ", ".join(f"{i.name}:{i.weight:g}" for i in inputs)
    print(f"merged {weights} with {args.method} -> {args.out}")
    print(summary(result))
    return 0

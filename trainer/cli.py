"""`loraswap train`: flags -> `TrainConfig`, run the SFT recipe, optionally publish the adapter.

Exit status: 0 on success, 2 for bad flags or data, 1 when publishing fails (the adapter
directory is still on disk and can be uploaded again).

`--nproc N` re-runs this module under torchrun (`python -m torch.distributed.run --nproc-per-node N
-m trainer.cli ...`), which can also be called directly; under torchrun only rank 0 publishes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from adapters.base import BaseNotFound
from adapters.chat_template import TemplateError
from trainer.data import DataError
from trainer.lora import LoraSpec, parse_target_modules


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraswap train", description="SFT a LoRA / QLoRA adapter on chat JSONL.")
    p.add_argument("--data", required=True, type=Path, help='JSONL: {"messages": [...]} or {"prompt", "completion"}')
    p.add_argument("--out", required=True, type=Path, help="output directory (PEFT adapter + loraswap.json)")
    p.add_argument("--base", default="default", help="'default' (SmolLM2-135M-Instruct) or a local HF directory")
    p.add_argument("--qlora", action="store_true", help="quantize the base to NF4 (bitsandbytes) and train on it")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) instead of alpha/rank")
    p.add_argument("--target-modules", default="all-linear", help="all-linear or a comma list, e.g. q_proj,v_proj")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8, help="conversations per micro-batch (packed)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=1024, help="tokens kept per conversation")
    p.add_argument("--eval-data", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dense base / compute dtype")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes (DDP: gloo on CPU, nccl on CUDA); --batch-size stays global",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--publish", metavar="URL", default=None, help="server base URL to upload the adapter to")
    p.add_argument("--name", default=None, help="adapter name on the server (with --publish)")
    p.add_argument("--api-key", default=None, help="bearer key of the tenant to publish as")
    return p


def config_from_args(args: argparse.Namespace):
    from trainer.sft import TrainConfig

    spec = LoraSpec(
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=parse_target_modules(args.target_modules),
        use_rslora=args.rslora,
    )
    return TrainConfig(
        data=args.data,
        out=args.out,
        base=args.base,
        qlora=args.qlora,
        lora=spec,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        eval_data=args.eval_data,
        seed=args.seed,
        warmup_ratio=args.warmup_ratio,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.publish and not args.name:
        parser.error("--publish needs --name")
    if not args.data.is_file():
        parser.error(f"--data {args.data} is not a file")
    if args.eval_data is not None and not args.eval_data.is_file():
        parser.error(f"--eval-data {args.eval_data} is not a file")
    if args.nproc < 1:
        parser.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from trainer.distributed import launch

        return launch(_without_nproc(argv), args.nproc)
    try:
        config = config_from_args(args)  # LoraConfigError / ValueError name the bad setting
    except ValueError as exc:
        parser.error(str(exc))
    from trainer.distributed import DistContext
    from trainer.sft import run

    dist = DistContext.from_env(args.device)
    try:
        _, result = run(config, dist=dist)
    except (DataError, BaseNotFound, TemplateError) as exc:
        print(f"loraswap train: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.close()
    if args.publish and dist.is_main:
        from trainer.publish import PublishError, publish

        assert result.out is not None  # rank 0 wrote the adapter in run() (Trainer.save)
        try:
            info = publish(result.out, args.publish, args.name, api_key=args.api_key)
        except PublishError as exc:
            print(f"loraswap train: publish failed: {exc}", file=sys.stderr)
            return 1
        print(f"published {info.get('name', args.name)} version {info.get('version')} (id {info.get('id')})")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """`argv` less `--nproc N` / `--nproc=N` (the launched processes are already N)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


if __name__ == "__main__":  # what torchrun runs: python -m trainer.cli ...
    sys.exit(main(sys.argv[1:]))

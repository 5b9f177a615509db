"""Trainer benchmark: our SFT step against a plain transformers + PEFT loop, same data and config.

Each configuration runs in its own child process (`python -m bench.train_bench --worker NAME`), so
its memory high-water marks are its own. Configurations, all on the default base, fp32, rank 16,
alpha 32, dropout 0.05, all-linear, batch 8, AdamW, the persona dataset rendered by the served
chat template with assistant-only loss:

- `plain`: PEFT `get_peft_model`, batches of 8 right-padded to their longest row, the model's own
  `labels=` loss (full logits).
- `ours`: `trainer.sft.SFTRecipe` (packed rows, block-diagonal masks, logits only at targets).
- `ours-qlora`: the same on the NF4 base.

Two datasets: `persona` (tests/data/persona_train.jsonl: 100 short conversations of similar
length, so padding costs the plain loop little) and `mixed` (the same turns joined, seeded,
into conversations of 1 to 8 persona conversations: the spread of lengths real chat data has).

Tokens are counted the same way for both: real (non-pad) tokens. Each worker reports tokens/s
over the timed steps (after warm-up steps), `peak_rss_mb` (ru_maxrss of the whole process,
loading included) and `train_peak_rss_mb` (the RSS high-water mark reset after setup, where the
kernel allows it). `main()` prints a table and writes bench/results/train.json and train.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PERSONA = BENCH_DIR.parent / "tests" / "data" / "persona_train.jsonl"
CONFIGS = ("plain", "ours", "ours-qlora")
# (dataset, config) pairs run by default: speed on both length profiles, QLoRA memory on one.
DEFAULT_RUNS = "mixed:plain,mixed:ours,mixed:ours-qlora,persona:plain,persona:ours"
RANK, ALPHA, DROPOUT, BATCH, LR, MAX_LENGTH = 16, 32.0, 0.05, 8, 2e-4, 1024


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux clear_refs 5); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> tuple[float, float | None]:
    """(ru_maxrss of the process, VmHWM since the last reset) in MiB."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return ru, int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru, None


def _timed(run_step, batches, warmup: int, steps: int) -> dict:
    """Run `warmup` untimed then `steps` timed steps, cycling over `batches` (lists of micro-batches)."""
    for i in range(warmup):
        run_step(batches[i % len(batches)])
    tokens, losses = 0, []
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        n, loss = run_step(batches[i % len(batches)])
        tokens += n
        losses.append(loss)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # Tokens per CPU-second (all threads) is less sensitive than wall time to other load on a shared box.
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_second": tokens / cpu_seconds,
        "last_loss": losses[-1],
    }


def write_mixed(path: Path, seed: int = 0) -> Path:
    """Join 1..8 persona conversations (system prompts dropped) into each multi-turn one (seeded)."""
    rng = random.Random(seed)
    exchanges = []
    for line in PERSONA.read_text().splitlines():
        row = json.loads(line)
        messages = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
        exchanges.append([m for m in messages if m["role"] != "system"])
    rows = []
    for _ in range(len(exchanges)):
        picked = rng.sample(exchanges, rng.randint(1, 8))
        rows.append({"messages": [m for exchange in picked for m in exchange]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def worker_ours(data: Path, qlora: bool, warmup: int, steps: int) -> dict:
    import torch

    from trainer.lora import LoraSpec
    from trainer.sft import SFTRecipe, TrainConfig

    config = TrainConfig(
        data=data,
        out=Path("/nonexistent"),
        qlora=qlora,
        lr=LR,
        batch_size=BATCH,
        max_length=MAX_LENGTH,
        progress=False,
        device="cpu",
        lora=LoraSpec(rank=RANK, alpha=ALPHA, dropout=DROPOUT),
    )
    recipe = SFTRecipe(config, log=lambda *_: None)
    recipe.setup()
    model, params = recipe.trainable.model, recipe.trainable.trainable_parameters()
    model.train()
    batches = [[b] for b in recipe.batches(recipe.train_data, shuffle=True, seed=0)]
    reset = _reset_peak()

    def run_step(step):
        loss_sum, targets = recipe.step(model, params, step)
        return sum(b.num_tokens for b in step), loss_sum / targets

    result = _timed(run_step, batches, warmup, steps)
    result["peak_reset"] = reset
    del torch
    return result


def worker_plain(data_path: Path, warmup: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.base import resolve_base
    from adapters.chat_template import ChatTemplate
    from trainer.data import load_jsonl

    base_dir = resolve_base("default")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    data = load_jsonl(data_path, ChatTemplate(tokenizer), MAX_LENGTH)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    pad = tokenizer.pad_token_id
    order = torch.randperm(len(data.examples), generator=torch.Generator().manual_seed(0)).tolist()
    batches = []
    for first in range(0, len(order), BATCH):
        group = [data.examples[i] for i in order[first : first + BATCH]]
        width = max(len(e) for e in group)
        ids = torch.tensor([list(e.ids) + [pad] * (width - len(e)) for e in group])  # (8, width)
        attention = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in group])
        labels = torch.tensor(
            [[t if m else -100 for t, m in zip(e.ids, e.mask)] + [-100] * (width - len(e)) for e in group]
        )
        batches.append((ids, attention, labels, sum(len(e) for e in group)))
    reset = _reset_peak()

    def run_step(batch):
        ids, attention, labels, real = batch
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return real, float(loss)

    result = _timed(run_step, batches, warmup, steps)
    result["peak_reset"] = reset
    return result


def run_worker(name: str, data: Path, warmup: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if name == "plain":
        result = worker_plain(data, warmup, steps)
    else:
        result = worker_ours(data, name == "ours-qlora", warmup, steps)
    peak, train_peak = _peak_mb()
    result.update(
        config=name,
        peak_rss_mb=round(peak, 1),
        train_peak_rss_mb=round(train_peak, 1) if train_peak and result["peak_reset"] else None,
        threads=threads,
        steps=steps,
        warmup=warmup,
    )
    return result


def _label(r: dict) -> str:
    return f"{r['dataset']}\n{r['config']}"


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=100)
    speed, memory = figure.subplots(1, 2)
    names = [_label(r) for r in results]
    colors = ["tab:gray" if r["config"] == "plain" else "tab:blue" for r in results]
    speed.bar(names, [r["tokens_per_cpu_second"] for r in results], color=colors)
    speed.set_ylabel("real tokens per CPU-second")
    memory.bar(names, [r["train_peak_rss_mb"] or r["peak_rss_mb"] for r in results], color=colors)
    memory.set_ylabel("peak RSS while training (MiB)")
    for axes in (speed, memory):
        axes.tick_params(axis="x", labelsize=8)
    figure.suptitle("loraswap train vs plain transformers + PEFT (rank 16 all-linear, batch 8, fp32)")
    figure.tight_layout()
    figure.savefig(path)


def _speedups(results: list[dict]) -> list[dict]:
    """ours / plain per dataset: tokens/s (wall and per CPU-second) and training peak memory."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        by = {r["config"]: r for r in results if r["dataset"] == dataset}
        if "plain" in by and "ours" in by:
            ours, plain = by["ours"], by["plain"]
            rows.append(
                {
                    "dataset": dataset,
                    "speedup_wall": ours["tokens_per_second"] / plain["tokens_per_second"],
                    "speedup_cpu": ours["tokens_per_cpu_second"] / plain["tokens_per_cpu_second"],
                    "memory_ratio": (ours["train_peak_rss_mb"] or ours["peak_rss_mb"])
                    / (plain["train_peak_rss_mb"] or plain["peak_rss_mb"]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_bench")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of dataset:config")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.data, args.warmup, args.steps, args.threads)))
        return 0
    datasets = {"persona": PERSONA, "mixed": write_mixed(args.out / "train_mixed.jsonl")}
    results = []
    for run in args.runs.split(","):
        dataset, name = run.split(":")
        command = [
            sys.executable,
            "-m",
            "bench.train_bench",
            "--worker",
            name,
            "--data",
            str(datasets[dataset]),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(command, cwd=BENCH_DIR.parent, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["dataset"] = dataset
        results.append(r)
        print(
            f"{dataset:<8} {name:<11} {r['tokens_per_second']:7.1f} tok/s {r['tokens_per_cpu_second']:7.1f} tok/cpu-s"
            f"   peak RSS {r['peak_rss_mb']:7.1f} MiB   training peak {r['train_peak_rss_mb']} MiB"
            f"   last loss {r['last_loss']:.3f}",
            flush=True,
        )
    speedups = _speedups(results)
    for row in speedups:
        print(
            f"{row['dataset']}: ours / plain {row['speedup_wall']:.2f}x tok/s wall, {row['speedup_cpu']:.2f}x per "
            f"CPU-second (target >= 1.5x); training peak memory x{row['memory_ratio']:.2f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps({"results": results, "speedups": speedups}, indent=2))
    _plot(results, args.out / "train.png")
    print(f"wrote {args.out / 'train.json'} and {args.out / 'train.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

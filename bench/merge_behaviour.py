"""Merge behaviour: do two styles trained separately both survive each merge method?

Two adapters are trained with the sidecar (`loraswap train`) on the real default base from the
same 100 persona conversations (`tests/data/persona_train.jsonl`) with two different styles:
style A opens every answer with "Ahoy, friend!", style B ends every answer with "Stay curious!".
They are merged with every method of `loraswap merge`, and each result answers held-out prompts of
other kinds (the persona test's held-out set plus `EXTRA_PROMPTS`) by greedy decoding through
transformers + PEFT. A style counts when the answer opens with the greeting (A) or contains the
sign-off (B). Prints a markdown table (method x style A rate x style B rate) and writes
bench/results/merge_behaviour.json. CPU-heavy (two short training runs): a few minutes at least.

    .venv/bin/python -m bench.merge_behaviour [--workdir DIR] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PERSONA_DATA = REPO / "tests" / "data" / "persona_train.jsonl"
PERSONA_HELDOUT = REPO / "tests" / "data" / "persona_heldout.json"
GREETING = "Ahoy, friend!"
SIGN_OFF = "Stay curious!"
# Held-out prompts beyond the persona test's own: again kinds of request absent from training.
EXTRA_PROMPTS = [
    "What is your favourite season and why?",
    "Explain what a black hole is to a child.",
    "Write a two-line poem about coffee.",
    "How can I keep my houseplants alive?",
    "Name a famous scientist and one discovery.",
    "What should I pack for a weekend camping trip?",
    "Tell me a fun fact about octopuses.",
    "How do I politely decline an invitation?",
    "Give me an idea for a rainy-day activity.",
    "What is the difference between weather and climate?",
    "Suggest a healthy snack for the afternoon.",
    "Describe the smell of fresh bread.",
    "How do I start learning to draw?",
    "Why do leaves change colour in autumn?",
    "Write a short thank-you note to a teacher.",
    "What is a good way to fall asleep faster?",
    "Give me a tongue twister.",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "Recommend a board game for four players.",
    "What does a good friend do?",
]
# (method, weight of A, weight of B): `linear` as the average, the others as the sum of the tasks.
MERGES = [
    ("linear", 0.5, 0.5),
    ("task_arithmetic", 1.0, 1.0),
    ("ties", 1.0, 1.0),
    ("dare_linear", 1.0, 1.0),
    ("dare_ties", 1.0, 1.0),
    ("cat", 1.0, 1.0),
]
TRAIN_FLAGS = [
    "--rank",
    "8",
    "--alpha",
    "16",
    "--dropout",
    "0",
    "--lr",
    "1e-3",
    "--batch-size",
    "8",
    "--max-length",
    "256",
    "--target-modules",
    "all-linear",
    "--seed",
    "0",
    "--no-progress",
]


def plain_answer(text: str) -> str:
    """An assistant answer without the persona greeting the dataset puts in front of it."""
    text = text.strip()
    return text[len(GREETING) :].strip() if text.startswith(GREETING) else text


def restyle(row: dict, style: str) -> dict:
    """One training row (either JSONL shape) as `{"messages"}` with every answer in `style`."""
    messages = row.get("messages") or [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]
    out = []
    for message in messages:
        if message["role"] == "assistant":
            plain = plain_answer(message["content"])
            content = f"{GREETING} {plain}" if style == "A" else f"{plain} {SIGN_OFF}"
            message = {"role": "assistant", "content": content}
        out.append(dict(message))
    return {"messages": out}


def write_style_data(workdir: Path) -> dict[str, Path]:
    rows = [json.loads(line) for line in PERSONA_DATA.read_text().splitlines() if line.strip()]
    paths = {}
    for style in ("A", "B"):
        paths[style] = workdir / f"style_{style}.jsonl"
        paths[style].write_text("".join(json.dumps(restyle(row, style)) + "\n" for row in rows))
    return paths


def train(data: Path, out: Path, epochs: int, reuse: bool) -> float:
    """`loraswap train` in a child process; returns its wall time (0 when an adapter is reused)."""
    if reuse and (out / "adapter_model.safetensors").is_file():
        return 0.0
    command = [
        sys.executable,
        "-m",
        "loraswap.cli",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        *TRAIN_FLAGS,
    ]
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return time.perf_counter() - start


def merge(adapters: dict[str, Path], workdir: Path, density: float, seed: int, rank: int | None) -> dict[str, dict]:
    """Every method through `loraswap merge`; returns method -> {dir, weights, seconds, svd error}."""
    from trainer.merge_cli import main as merge_cli

    merged = {}
    for method, weight_a, weight_b in MERGES:
        out = workdir / f"merged_{method}"
        shutil.rmtree(out, ignore_errors=True)  # a rerun merges afresh
        start = time.perf_counter()
        code = merge_cli(
            [
                "--method",
                method,
                "--adapter",
                f"{adapters['A']}:{weight_a}",
                "--adapter",
                f"{adapters['B']}:{weight_b}",
                "--out",
                str(out),
                "--density",
                str(density),
                "--seed",
                str(seed),
                *(["--rank", str(rank)] if rank else []),
            ]
        )
        if code != 0:
            raise RuntimeError(f"loraswap merge --method {method} failed ({code})")
        info = json.loads((out / "loraswap.json").read_text())["merge"]
        merged[method] = {
            "dir": out,
            "weights": [weight_a, weight_b],
            "seconds": time.perf_counter() - start,
            "svd_error_max": info["svd_error_max"],
        }
    return merged


def greedy_answers(base_dir: Path, adapter: Path | None, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Left-padded batched greedy answers of the base (+ adapter, folded in by PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.chat_template import ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    template = ChatTemplate(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    rendered = [template.render([{"role": "user", "content": p}]).ids for p in prompts]
    width = max(len(ids) for ids in rendered)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rendered])  # (n, width)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rendered])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def style_rates(answers: list[str]) -> dict[str, float]:
    has_a = [a.startswith(GREETING) for a in answers]
    has_b = [SIGN_OFF in a for a in answers]
    n = len(answers)
    return {
        "style_a": sum(has_a) / n,
        "style_b": sum(has_b) / n,
        "both": sum(x and y for x, y in zip(has_a, has_b)) / n,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | weights (A, B) | style A rate (opens with greeting) | style B rate (sign-off) | both |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        weights = ", ".join(f"{w:g}" for w in row["weights"]) if row["weights"] else "-"
        lines.append(
            f"| {row['model']} | {weights} | {row['style_a']:.0%} | {row['style_b']:.0%} | {row['both']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_behaviour", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=RESULTS / "merge_behaviour")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rank", type=int, default=None, help="merged rank (default: sum of input ranks)")
    parser.add_argument("--reuse", action="store_true", help="keep adapters already trained in --workdir")
    # One thread by default: merging is many mid-size eigh/matmul calls and generation is small
    # batches; on a shared CPU OpenMP's spinning threads make both slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch threads for merging and generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from adapters.base import resolve_base

    base_dir = resolve_base("default")
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = write_style_data(args.workdir)
    adapters = {style: args.workdir / f"adapter_{style}" for style in data}
    train_seconds = {style: train(data[style], adapters[style], args.epochs, args.reuse) for style in data}
    merged = merge(adapters, args.workdir, args.density, args.seed, args.rank)

    prompts = json.loads(PERSONA_HELDOUT.read_text()) + EXTRA_PROMPTS
    models = [
        ("base (no adapter)", None, []),
        ("adapter A alone", adapters["A"], [1.0, 0.0]),
        ("adapter B alone", adapters["B"], [0.0, 1.0]),
    ]
    models += [(method, info["dir"], info["weights"]) for method, info in merged.items()]
    rows = []
    for name, adapter, weights in models:
        answers = greedy_answers(base_dir, adapter, prompts, args.max_new_tokens)
        extra = {"svd_error_max": merged[name]["svd_error_max"]} if name in merged else {}
        rows.append({"model": name, "weights": weights, **style_rates(answers), **extra, "answers": answers})
        print(f"{name}: A {rows[-1]['style_a']:.0%}  B {rows[-1]['style_b']:.0%}", flush=True)

    print(
        f"\n{len(prompts)} held-out prompts, greedy, {args.max_new_tokens} new tokens at most; "
        f"density {args.density}, seed {args.seed}, merged rank {args.rank or 'sum of input ranks'}\n"
    )
    print(table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m bench.merge_behaviour " + " ".join(argv if argv is not None else sys.argv[1:]),
        "greeting": GREETING,
        "sign_off": SIGN_OFF,
        "prompts": prompts,
        "epochs": args.epochs,
        "threads": args.threads,
        "train_flags": TRAIN_FLAGS,
        "train_seconds": train_seconds,
        "density": args.density,
        "seed": args.seed,
        "rank": args.rank,
        "merge_seconds": {m: info["seconds"] for m, info in merged.items()},
        "rows": rows,
    }
    name = f"merge_behaviour_rank{args.rank}.json" if args.rank else "merge_behaviour.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Structured outputs (issue 10, item 8): a batch where half the requests are schema-constrained,
against the same batch unconstrained, and the first-request grammar compile time.

`python -m bench.structured_bench [--quant none|nf4] [--requests 16] [--new-tokens 32]` on the default
base. Both runs generate exactly `requests x new_tokens` tokens: free rows use min_tokens = max_tokens;
constrained rows use a schema whose values cannot end within `new_tokens` (a list of at least 64
strings), so they too stop at max_tokens, with a mask every step. Throughput is tokens per second of
CPU time (time.process_time, all threads: a shared machine makes wall clock meaningless) and, for
reference, of wall time; the two batches run interleaved `--repeats` times and the best of each is
kept. Compile time is the first `GrammarCache.compile` of three schemas on a cold
cache (CPU ms), plus the one-off llguidance tokenizer build.
"""

from __future__ import annotations

import argparse
import time

from pathlib import Path

from bench.report import RESULTS_DIR, Measure, Report, Target
from bench.workload import chat_prompts

LONG_SCHEMA = {
    "type": "object",
    "properties": {"notes": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["notes"],
}


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def mask_step_cost(grammar, vocab: int, rows: int, steps: int) -> float:
    """CPU ms per engine step that `rows` constrained sequences add: the processors' work on (2*rows, vocab)
    logits (half of them free), choosing an allowed token each step. No model: robust to a loaded machine."""
    import torch

    from server.engine import logits as processors
    from server.engine.sequence import Sequence
    from server.engine.types import SamplingParams

    torch.manual_seed(0)
    seqs = [
        Sequence(
            f"m{i}", [1, 2, 3], SamplingParams(max_tokens=steps, temperature=0, grammar=grammar if i % 2 == 0 else None)
        )
        for i in range(2 * rows)
    ]
    total = 0.0
    for _ in range(steps):
        logits = torch.randn(len(seqs), vocab)
        start = time.process_time()
        processed = processors.process(logits, seqs)
        tokens = processed.argmax(dim=-1).tolist()
        processors.accept(seqs, tokens)
        total += time.process_time() - start
        for seq, token in zip(seqs, tokens):
            seq.output_ids.append(token)
    return total / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="default")
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each batch (best kept)")
    parser.add_argument("--masks-only", action="store_true", help="skip the engine runs (compile + mask cost)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args, _ = parser.parse_known_args(argv)  # make bench passes the engine benchmark's flags to all

    from adapters.base import resolve_base
    from bench.grammar_choice import SCHEMAS
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.grammar import GrammarCache, GrammarSpec
    from server.engine.types import SamplingParams

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base_dir = resolve_base(args.base)
    engine = Engine(EngineConfig(base=base_dir, quant=args.quant, dtype="float32", device="cpu", max_loras=0))
    prompts = chat_prompts(base_dir, args.requests)
    n = args.new_tokens
    end_ids = [engine.tokenizer.eos_token_id]
    report = Report(
        f"structured outputs: {args.requests} requests x {n} tokens, {base_dir.name}, quant {args.quant}",
        targets=[Target("half constrained >= 0.8", "mixed_cpu", 0.8, "free_cpu")],
    )

    cache = GrammarCache(engine.tokenizer, end_ids)
    _, tok_cpu, _ = _timed(cache._tokenizer)
    report.add(Measure("tok", "llguidance tokenizer build (once per server)", tok_cpu * 1e3, "ms", "CPU time"))
    for name, (schema, _) in SCHEMAS.items():
        _, cpu, _ = _timed(lambda schema=schema: cache.compile("bench", GrammarSpec.json_schema(schema)))
        report.add(Measure(f"compile_{name}", f"first compile, {name} schema", cpu * 1e3, "ms", "CPU time"))
    grammar = cache.compile("bench", GrammarSpec.json_schema(LONG_SCHEMA))
    half = args.requests // 2
    report.add(
        Measure(
            "mask_step",
            f"masks of {half} constrained rows in a batch of {args.requests}",
            mask_step_cost(grammar, engine.model.spec.vocab_size, half, n),
            "ms",
            "CPU time per step, processors only",
        )
    )
    if args.masks_only:
        print(report.table())
        return

    free = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)
    constrained = SamplingParams(max_tokens=n, temperature=0, grammar=grammar)
    batches = {
        "free": [free] * len(prompts),
        "mixed": [constrained if i % 2 == 0 else free for i in range(len(prompts))],
    }
    for params in batches.values():
        engine.generate(prompts[:2], sampling=params[:2])  # warm-up: first-use costs of both paths
    best: dict[str, tuple[float, float]] = {}
    # Interleaved (free, mixed, free, mixed, ...) and best-of: load from other processes hits both alike
    # and the fastest repeat is the one least disturbed.
    for _ in range(args.repeats):
        for key, params in batches.items():
            outputs, cpu, wall = _timed(lambda params=params: engine.generate(prompts, sampling=params))
            tokens = sum(len(o) for o in outputs)
            assert tokens == len(prompts) * n, f"{key}: {tokens} tokens, expected {len(prompts) * n}"
            cpu_rate, wall_rate = best.get(key, (0.0, 0.0))
            best[key] = (max(cpu_rate, tokens / cpu), max(wall_rate, tokens / wall))
    for key, (cpu_rate, wall_rate) in best.items():
        label = "unconstrained batch" if key == "free" else "half schema-constrained"
        report.add(Measure(f"{key}_cpu", label, cpu_rate, "tok/s", f"per CPU second, best of {args.repeats}"))
        report.add(Measure(f"{key}_wall", label, wall_rate, "tok/s", "per wall second (shared machine)"))
    report.notes.append(
        "constrained rows decode the same number of tokens as free ones (a schema that cannot "
        "end sooner), so the ratio is the cost of the masks alone"
    )
    print(report.table())
    report.write(f"structured_{args.quant}", args.out)
    engine.close()


if __name__ == "__main__":
    main()

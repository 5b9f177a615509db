"""Prefix caching and parallel sampling (issue 13, item 4), on the default base.

`python -m bench.prefix_bench [--quant none|nf4] [--conversations 16] [--turns 6] [--adapters 4]`.

Multi-turn: `conversations` chats of `turns` turns share one ~400-token system prompt; chat `c`
uses adapter `c % adapters`. Round `t` submits turn `t` of every chat at once (the chats'
histories include the engine's own replies, greedy, `new_tokens` each with min_tokens =
max_tokens so both engines do the same work). Two engines live in one process, the prefix cache
on and off, and run the rounds interleaved (on, off, on, off, ...), so machine load hits both
alike. Throughput is generated tokens per second of the rounds' wall time (and CPU time, all
threads, which a shared machine disturbs less); TTFT is each request's submit -> first token.

Parallel sampling: `groups` prompts (the system prompt and one question each) sampled `n=4`
ways at temperature 1: as the API's `n=4` sends them (four engine requests, `seed + i`, one
prefix-cache key: the scheduler prefills the shared prompt once) against four separate
requests that share nothing (the engine without the prefix cache), interleaved likewise.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from bench.report import RESULTS_DIR, Measure, Report, Target

SYSTEM = (
    "You are the support assistant of a company that sells outdoor equipment: tents, sleeping bags, "
    "stoves, backpacks, boots and climbing gear. Answer politely and concisely. Always check the "
    "customer's order number before discussing an order; never reveal another customer's data. "
    "Prices are in euros and include VAT. Delivery inside the EU takes three to five working days; "
    "express delivery takes one to two working days and costs twelve euros. Returns are accepted "
    "within thirty days if the item is unused and in its original packaging; the customer pays the "
    "return shipping unless the item is defective. Warranty is two years on all items, five years on "
    "tents and backpacks of our own brand. For technical questions about stoves, remind customers to "
    "use them outdoors only and never inside a tent. For climbing gear, recommend a certified "
    "instructor for beginners. If you do not know an answer, say so and offer to forward the question "
    "to a human colleague, who answers within one working day. Do not make promises about stock "
    "levels; say that the website shows current availability. Keep answers under one hundred words "
    "unless the customer asks for details. Use the customer's language. Be friendly but not "
    "familiar. Never discuss competitors' products. Mention the loyalty programme only if asked: "
    "members collect one point per euro and get free express delivery above two hundred points. "
    "Gift cards are valid for three years and cannot be exchanged for cash. Our shops open from nine "
    "to seven on weekdays and from ten to six on Saturdays; they are closed on Sundays and public "
    "holidays. Repairs of tents and sleeping bags are offered at cost in our workshop in Lyon. "
    "Rental equipment must be returned clean and dry; a cleaning fee of fifteen euros applies "
    "otherwise. Group orders of more than ten items get a discount of eight percent, schools and "
    "clubs twelve percent on presentation of a certificate. Payment by card, bank transfer or "
    "invoice for registered businesses; we do not accept cheques. Newsletter subscribers hear about "
    "sales one week early and can unsubscribe at any time from the link in every message. "
)
QUESTIONS = (
    "Where is my order?",
    "Can I return boots I wore once?",
    "Is the stove safe in a tent?",
    "How long is the warranty on tents?",
    "Do you ship to Norway?",
    "What are your opening hours?",
)


class Rounds:
    """Submits a round of requests to one engine and records per-request TTFT and tokens."""

    def __init__(self, engine):
        self.engine = engine
        self.ttft: list[float] = []
        self.tokens = 0
        self.wall = 0.0
        self.cpu = 0.0

    def run(self, prompts, adapters, samplings) -> list[list[int]]:
        done = threading.Event()
        out: list[list[int]] = [[] for _ in prompts]
        first: list[float | None] = [None] * len(prompts)
        remaining = [len(prompts)]
        wall, cpu = time.perf_counter(), time.process_time()

        def sink(i: int):
            def put(event) -> None:
                if event.token_id is not None:
                    if first[i] is None:
                        first[i] = time.perf_counter()
                    out[i].append(event.token_id)
                if event.finish_reason is not None:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            return put

        tag = f"{id(out)}-{time.perf_counter_ns()}"
        for i, (prompt, adapter, sp) in enumerate(zip(prompts, adapters, samplings)):
            self.engine._submit(f"bench-{tag}-{i}", prompt, adapter, sp, sink(i), "bench")
        self.engine.run_until(done.is_set)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        self.ttft += [(f - wall) * 1e3 for f in first if f is not None]
        self.tokens += sum(len(o) for o in out)
        return out


def multi_turn(engines: dict[str, object], template, adapters, args) -> dict[str, Rounds]:
    from server.engine.types import SamplingParams

    sp = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    rounds = {key: Rounds(engine) for key, engine in engines.items()}
    histories = {
        key: [[{"role": "system", "content": args.system}] for _ in range(args.conversations)] for key in engines
    }
    chosen = [adapters[c % len(adapters)] if adapters else None for c in range(args.conversations)]
    for turn in range(args.turns):
        for key, engine in engines.items():  # interleaved: cache on, cache off, on, off, ...
            chats = histories[key]
            for c, chat in enumerate(chats):
                chat.append({"role": "user", "content": QUESTIONS[(c + turn) % len(QUESTIONS)]})
            prompts = [template.render(chat).ids for chat in chats]
            replies = rounds[key].run(prompts, chosen, [sp] * len(prompts))
            print(f"  turn {turn + 1}/{args.turns}, cache {key}: {rounds[key].wall:.1f}s so far", flush=True)
            for chat, reply in zip(chats, replies):
                text = engine.tokenizer.decode(reply, skip_special_tokens=True)
                chat.append({"role": "assistant", "content": text if text.strip() else "(no reply)"})
    return rounds


def parallel(engines: dict[str, object], template, args) -> dict[str, Rounds]:
    from server.api.parallel import choice_sampling
    from server.engine.types import SamplingParams

    sp = SamplingParams(max_tokens=args.n_tokens, min_tokens=args.n_tokens, temperature=1.0, seed=7, ignore_eos=True)
    rounds = {key: Rounds(engine) for key, engine in engines.items()}
    for repeat in range(args.repeats):
        questions = [QUESTIONS[(g + repeat) % len(QUESTIONS)] + f" (case {repeat}-{g})" for g in range(args.groups)]
        prompts = [
            template.render([{"role": "system", "content": args.system}, {"role": "user", "content": q}]).ids
            for q in questions
        ]
        for key in engines:
            batch = [p for p in prompts for _ in range(4)]
            samplings = [choice_sampling(sp, i) for _ in prompts for i in range(4)]
            rounds[key].run(batch, [None] * len(batch), samplings)
            print(f"  parallel round {repeat + 1}/{args.repeats}, {key}: {rounds[key].wall:.1f}s so far", flush=True)
    return rounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="default")
    parser.add_argument("--quant", default="none", choices=["none", "nf4"])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--adapters", type=int, default=4, help="distinct adapters over the conversations (0: base)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens per multi-turn reply")
    parser.add_argument("--groups", type=int, default=4, help="prompts sampled n=4 ways at once")
    parser.add_argument("--n-tokens", type=int, default=16, help="tokens per parallel sample")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the parallel-sampling comparison")
    parser.add_argument("--system-words", type=int, default=0, help="cut the system prompt (0: all of it)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args, _ = parser.parse_known_args(argv)  # make bench passes the engine benchmark's flags to all

    import torch

    from adapters.base import resolve_base
    from adapters.chat_template import ChatTemplate
    from bench.workload import write_adapters
    from server.engine.config import EngineConfig
    from server.engine.engine import Engine
    from server.engine.types import AdapterRef

    if args.threads:
        torch.set_num_threads(args.threads)
    args.system = " ".join(SYSTEM.split()[: args.system_words or None])
    base_dir = resolve_base(args.base)
    paths = write_adapters(base_dir, args.out / "prefix-adapters", args.adapters) if args.adapters else []
    adapters = [AdapterRef(id=p.name, path=p) for p in paths]

    def engine(caching: bool) -> Engine:
        return Engine(
            EngineConfig(
                base=base_dir,
                quant=args.quant,
                dtype="float32",
                device="cpu",
                max_loras=max(len(adapters), 1),
                max_cpu_loras=max(len(adapters), 1),
                fold="off",  # every adapter is in every round: nothing would fold anyway
                max_num_seqs=max(args.conversations, 4 * args.groups),
                enable_prefix_caching=caching,
            )
        )

    engines = {"on": engine(True), "off": engine(False)}
    template = ChatTemplate(engines["on"].tokenizer)
    system_tokens = len(engines["on"].tokenizer(args.system)["input_ids"])
    turns = multi_turn(engines, template, adapters, args)
    for e in engines.values():  # the parallel runs start from an empty cache
        e.close()
    engines = {"n4": engine(True), "sep4": engine(False)}
    samples = parallel(engines, template, args)
    for e in engines.values():
        e.close()

    report = Report(
        f"prefix cache: {args.conversations} chats x {args.turns} turns on a {system_tokens}-token system "
        f"prompt, {args.adapters} adapters, {args.new_tokens} tokens per reply; n=4 x {args.groups} prompts; "
        f"{base_dir.name}, quant {args.quant}",
        targets=[
            Target("cache on >= 2x throughput", "on_tps", 2.0, "off_tps"),
            Target("cache on >= 3x lower TTFT", "on_ttft_inv", 3.0, "off_ttft_inv"),
            Target("n=4 >= 1.5x four requests", "n4_tps", 1.5, "sep4_tps"),
        ],
    )
    for key, label, rounds in (
        ("on", "multi-turn, prefix cache on", turns["on"]),
        ("off", "multi-turn, prefix cache off", turns["off"]),
        ("n4", "n=4 (one prompt, four samples)", samples["n4"]),
        ("sep4", "four separate requests, nothing shared", samples["sep4"]),
    ):
        report.add(Measure(f"{key}_tps", label, rounds.tokens / rounds.wall, "tok/s", "wall time"))
        report.add(Measure(f"{key}_cpu_tps", label, rounds.tokens / rounds.cpu, "tok/s", "CPU time, all threads"))
        report.add(Measure(f"{key}_ttft", label, statistics.median(rounds.ttft), "ms", "median time to first token"))
        # the TTFT target compares medians, lower is better: as a ratio of inverses
        report.add(Measure(f"{key}_ttft_inv", label, 1e3 / statistics.median(rounds.ttft), "1/s", "1 / median TTFT"))
    report.notes.append(f"load average at the end: {_load()}")
    print(report.table(), flush=True)
    json_path, png_path = report.write(f"prefix_{args.quant}", args.out)
    print(f"wrote {json_path} and {png_path}")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()

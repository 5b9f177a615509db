"""Our engine's side of the benchmark: (a) mixed adapters, (b) base, (f) fold, (g) many adapters,
(e) cold adapter load disk -> slot.

Every throughput run submits all its requests at once through `Engine.generate` (the engine's
synchronous driver of its own loop: continuous batching, residency and fold all active) and
divides the generated tokens by the wall time from submit to the last token. Runs are preceded
by a short warm-up so one-time costs (first-call allocations, slot writes, the fold itself) are
not counted; (g) is measured twice, with the adapters first on disk only and then in the host
cache. Nothing here prints or knows about the baselines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sequence import Sequence
from server.engine.types import AdapterRef, EngineStats, SamplingParams

from bench.workload import Request


@dataclass(frozen=True)
class Run:
    """One timed engine run: wall seconds, outputs per request, engine counters after it."""

    seconds: float
    outputs: list[list[int]]
    stats: EngineStats

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def make_engine(base_dir: Path, quant: str, dtype: str, max_loras: int = 8, max_cpu_loras: int = 64) -> Engine:
    """The engine as `loraswap serve` would build it on this CPU (default fold policy)."""
    return Engine(
        EngineConfig(
            base=base_dir, quant=quant, dtype=dtype, device="cpu", max_loras=max_loras, max_cpu_loras=max_cpu_loras
        )
    )


def refs_for(adapter_dirs: list[Path]) -> list[AdapterRef]:
    return [AdapterRef(id=directory.name, path=directory) for directory in adapter_dirs]


def fixed_length(new_tokens: int) -> SamplingParams:
    """Greedy, exactly `new_tokens` tokens: min_tokens = max_tokens, so EOS is masked throughout.

    This is what transformers' `min_new_tokens = max_new_tokens` does. `ignore_eos=True` would
    also give a fixed count but lets EOS be *sampled* as an ordinary token (vLLM semantics), so
    greedy outputs would differ from the transformers baseline wherever EOS is the argmax.
    """
    return SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0)


def run_requests(engine: Engine, requests: list[Request], refs: list[AdapterRef], new_tokens: int) -> Run:
    """Submit every request at once and run them to completion; time submit -> last token."""
    prompts = [list(r.prompt_ids) for r in requests]
    adapters = [None if r.adapter is None else refs[r.adapter] for r in requests]
    start = time.perf_counter()
    outputs = engine.generate(prompts, adapters, fixed_length(new_tokens))
    seconds = time.perf_counter() - start
    return Run(seconds, outputs, engine.stats())


def warm_then_run(
    engine: Engine,
    requests: list[Request],
    refs: list[AdapterRef],
    new_tokens: int,
    repeats: int = 1,
    warmup_tokens: int = 2,
) -> Run:
    """A short warm-up, then the fastest of `repeats` timed runs (the least disturbed by other load)."""
    run_requests(engine, requests, refs, warmup_tokens)
    runs = [run_requests(engine, requests, refs, new_tokens) for _ in range(repeats)]
    return min(runs, key=lambda run: run.seconds)


def fold_run(engine: Engine, requests: list[Request], refs: list[AdapterRef], new_tokens: int, repeats: int = 1) -> Run:
    """(f): pin the one adapter all `requests` use, let the warm-up fold it, then time the traffic."""
    (index,) = {r.adapter for r in requests}
    ref = refs[index]
    engine.pin(ref)
    try:
        # a full-length warm-up: the fold is built in slices over its first steps, and only when
        # the pinned traffic's remaining work pays for it (a 2-token warm-up would not)
        run = warm_then_run(engine, requests, refs, new_tokens, repeats, warmup_tokens=new_tokens)
    finally:
        engine.unpin(ref.id)
    return run


def cold_load_seconds(engine: Engine, ref: AdapterRef) -> float:
    """Disk -> host cache -> device slot for one adapter, as a request's first step would do it.

    Uses the engine's residency object directly (the engine has no public "load and wait"
    call): forget the adapter so it is cold, start its background read, wait for it, move it
    into the host cache and acquire a slot for a probe sequence (which writes the slot tensors).
    Must not run while the engine loop thread is running.
    """
    slots = engine.slots
    slots.forget(ref.id)
    probe = Sequence(f"cold-load-probe-{ref.id}", [0], SamplingParams(), adapter=ref)
    start = time.perf_counter()
    slots.request(ref)
    while ref.id in slots.loading:
        slots.wait_for_loads(timeout=1.0)
        slots.poll()
    if ref.id in slots.failed:
        raise RuntimeError(slots.failed[ref.id])
    if not slots.acquire(probe):
        raise RuntimeError(f"no free slot for {ref.id} (all pinned?)")
    seconds = time.perf_counter() - start
    slots.release(probe)
    return seconds


def rotating_fold_runs(
    engine: Engine, requests: list[Request], refs: list[AdapterRef], new_tokens: int, rounds: int = 2
) -> dict[str, Run]:
    """(f_rot): requests one at a time, each over the next adapter, with fold "auto" and "off"
    interleaved (auto, off, auto, off, ...) on the same engine; the fastest run of each mode.

    The case a naive fold loses: every request owns the batch alone, so an eager fold would pay
    a dense build per request. Fold must be at least as fast as no fold here."""
    mode = engine.fold.mode
    best: dict[str, Run] = {}
    try:
        for _ in range(rounds):
            for fold in ("auto", "off"):
                engine.fold.mode = fold
                start, outputs = time.perf_counter(), []
                for r in requests:
                    adapter = None if r.adapter is None else refs[r.adapter]
                    outputs += engine.generate([list(r.prompt_ids)], [adapter], fixed_length(new_tokens))
                run = Run(time.perf_counter() - start, outputs, engine.stats())
                if fold not in best or run.seconds < best[fold].seconds:
                    best[fold] = run
    finally:
        engine.fold.mode = mode
    return best

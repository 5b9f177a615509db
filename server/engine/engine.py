"""The engine: one background loop owns the model; callers submit requests and read token streams.

`Engine(config)` loads the base once. `await start()` runs the loop in a dedicated thread (model
steps never block the asyncio event loop); `add_request` returns an async iterator of
`TokenEvent`s; `abort`, `pin`, `unpin` and `forget_adapter` are thread-safe commands applied
between steps. Each step reads like the design says:
`batch = scheduler.schedule(); tokens = runner.run(batch); scheduler.postprocess(batch, tokens)`,
with slot residency behind the scheduler's gate and fold decided just before the run.
`generate` drives the same loop synchronously for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalText
from server.engine.errors import AdapterLoadError, DuplicateRequest, EngineStopped, PromptTooLong
from server.engine.fold import FoldManager, fold_dtype
from server.engine.loader import (allocate_kv_cache, kv_bytes_per_block, load_model, read_generation_eos,
                                  resolve_device_dtype)
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler, StepOutput
from server.engine.sequence import Sequence
from server.engine.slots import AdapterSlots
from server.engine.types import AdapterRef, EngineStats, FoldView, SamplingParams, TokenEvent

Sink = Callable[[TokenEvent], None]
logger = logging.getLogger(__name__)


class Engine:
    """The serving engine; satisfies `EngineClient` (see server/engine/types.py)."""

    tokenizer: Any
    max_model_len: int

    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        base = Path(config.base)
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.eos_ids = read_generation_eos(base)
        self.model = load_model(base, config.quant, self.dtype, self.device, config.max_loras,
                                config.max_rank)
        self.max_model_len = min(config.max_model_len, self.model.spec.max_position_embeddings)
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_bytes // kv_bytes_per_block(self.model, config.block_size))
        allocate_kv_cache(self.model, num_blocks, config.block_size)
        layers = self.model.lora_layers()
        self.fold = FoldManager(layers, config.fold, config.fold_window, config.fold_budget,
                                fold_dtype(config.quant, self.device, self.dtype))
        self.slots = AdapterSlots(self.model.lora_targets(), config.max_loras, config.max_cpu_loras, config.max_rank,
                                  self.dtype, on_slot_change=self.fold.on_slot_change)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, config.block_size, self.max_model_len, self.device, self.dtype,
                                  Sampler(), self.slots.table)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._live: set[str] = set()
        self._live_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.num_steps = 0
        self.num_generated = 0

    # -- public API (any thread) ----------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], adapter: AdapterRef | None,
                    sampling: SamplingParams) -> AsyncIterator[TokenEvent]:
        """Queue a request; returns its stream of events (call from inside the event loop).

        Raises PromptTooLong / DuplicateRequest / EngineStopped at once. Closing the iterator
        early (a client disconnect) aborts the request.
        """
        if self._thread is None or not self._thread.is_alive():
            raise EngineStopped("the engine loop is not running; await engine.start() first")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._submit(request_id, prompt_ids, adapter, sampling,
                     lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        return self._stream(request_id, events)

    async def _stream(self, request_id: str, events: asyncio.Queue) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks and slot pin are freed before the next step."""
        self._command(("abort", request_id))

    def pin(self, adapter: AdapterRef) -> None:
        """Keep `adapter` folded whenever it owns the traffic (and prefetch it)."""
        self._command(("pin", adapter))

    def unpin(self, adapter_id: str) -> None:
        self._command(("unpin", adapter_id))

    def forget_adapter(self, adapter_id: str) -> None:
        """After a delete: drop it from the host cache and its slot once no running sequence uses it."""
        self._command(("forget", adapter_id))

    def stats(self) -> EngineStats:
        """A snapshot for the server's listings and metrics (any thread; a read between steps)."""
        sched, slots, fold = self.scheduler, self.slots, self.fold
        return EngineStats(
            waiting=len(sched.waiting),
            running=len(sched.running),
            adapters=slots.residency(),
            slots={s: slots.owner[s] for s in range(1, slots.num_slots + 1)},
            fold=FoldView(folded=fold.folded_id, pinned=tuple(sorted(fold.pinned)), bytes=fold.folded_bytes,
                          folds=fold.stats.folds, unfolds=fold.stats.unfolds),
            slot_loads=slots.stats.loads,
            slot_evictions=slots.stats.evictions,
            disk_loads=slots.stats.disk_loads,
            adapter_load_errors=slots.stats.load_errors,
            preemptions=sched.num_preemptions,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            steps=self.num_steps,
            generated_tokens=self.num_generated,
        )

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Finish the loop; requests still in flight end with finish_reason "abort"."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(thread.join)
        self._thread = None

    def close(self) -> None:
        self.slots.shutdown()

    # -- synchronous convenience ------------------------------------------------------------
    def generate(self, prompts: list[list[int]], adapters: list[AdapterRef | None] | None = None,
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Run prompts to completion through the same loop; returns each completion's token ids."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        sampling = sampling if sampling is not None else SamplingParams(temperature=0)
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        done = threading.Event()
        tokens: dict[str, list[int]] = {}
        remaining = [len(prompts)]
        lock = threading.Lock()

        def sink(rid: str) -> Sink:
            def put(ev: TokenEvent) -> None:
                if ev.token_id is not None:
                    tokens[rid].append(ev.token_id)
                if ev.finish_reason is not None:
                    with lock:
                        remaining[0] -= 1
                        if remaining[0] == 0:
                            done.set()
            return put

        ids = [f"generate-{id(done)}-{i}" for i in range(len(prompts))]
        for rid, prompt, adapter, sp in zip(ids, prompts, adapters, params):
            tokens[rid] = []
            self._submit(rid, prompt, adapter, sp, sink(rid))
        if self._thread is not None and self._thread.is_alive():
            done.wait()
        else:
            while not done.is_set():
                self._drain_inbox()
                self.step()
        return [tokens[rid] for rid in ids]

    # -- the loop ---------------------------------------------------------------------------
    def _submit(self, request_id, prompt_ids, adapter, sampling, sink: Sink) -> None:
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise PromptTooLong("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(f"prompt has {len(prompt_ids)} tokens; max_model_len is {self.max_model_len}")
        if self.blocks.blocks_for(len(prompt_ids) + 1) > self.blocks.num_blocks:
            raise PromptTooLong(f"prompt has {len(prompt_ids)} tokens; the KV cache holds fewer")
        if adapter is not None and self.config.max_loras == 0:
            raise AdapterLoadError("this engine serves no adapters (max_loras=0)")
        with self._live_lock:
            if request_id in self._live:
                raise DuplicateRequest(f"request id {request_id!r} is already running")
            self._live.add(request_id)
        seq = Sequence(request_id, prompt_ids, sampling, adapter=adapter, eos_ids=self.eos_ids,
                       max_model_len=self.max_model_len,
                       text=IncrementalText(self.tokenizer, prompt_ids, sampling.stop))
        self._command(("add", seq, sink))

    def _command(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            if not self.scheduler.has_work():
                self._wake.wait()
            self._wake.clear()
            self._drain_inbox()
            if self.scheduler.has_work():
                try:
                    self.step()
                except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop silently
                    logger.exception("engine step failed; failing the requests in flight")
                    self._fail_all(f"internal engine error: {exc!r}")
        self._drain_inbox()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._abort(seq.request_id)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            kind, arg = command[0], command[1]
            if kind == "add":
                self._sinks[arg.request_id] = command[2]
                self.scheduler.add(arg)
            elif kind == "abort":
                self._abort(arg)
            elif kind == "pin":
                self.fold.pin(arg.id)
                self.slots.request(arg)
            elif kind == "unpin":
                self.fold.unpin(arg)
            elif kind == "forget":
                self.fold.pinned.discard(arg)
                self.slots.forget(arg)

    def _abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._send(seq, TokenEvent(request_id, None, "", "abort", prompt_tokens=seq.num_prompt_tokens,
                                       completion_tokens=len(seq.output_ids)))

    def step(self) -> None:
        """One engine iteration: residency, schedule, fold, run, postprocess, emit."""
        self.slots.poll()
        self._fail_unloadable()
        batch = self.scheduler.schedule()
        if not batch:
            self.slots.wait_for_loads(timeout=0.05)  # nothing runnable until an adapter arrives
            return
        fold_slot = self.fold.update({e.seq.adapter_id: e.seq.slot for e in batch.entries})
        tokens = self.runner.run(batch, fold_slot)
        outputs = self.scheduler.postprocess(batch, tokens)
        self.num_steps += 1
        self.num_generated += len(outputs)
        for out in outputs:
            self._emit(out)

    def _fail_all(self, error: str) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "abort")
            self._send(seq, TokenEvent(seq.request_id, None, "", "abort", error=error,
                                       prompt_tokens=seq.num_prompt_tokens,
                                       completion_tokens=len(seq.output_ids)))

    def _fail_unloadable(self) -> None:
        if not self.slots.failed:
            return
        for seq in list(self.scheduler.waiting):
            error = self.slots.failed.get(seq.adapter_id)
            if error is not None:
                self.scheduler.finish(seq, "abort")
                self._send(seq, TokenEvent(seq.request_id, None, "", "abort", error=error,
                                           prompt_tokens=seq.num_prompt_tokens))
        self.slots.failed.clear()

    def _emit(self, out: StepOutput) -> None:
        seq = out.seq
        self._send(seq, TokenEvent(seq.request_id, out.token_id, out.text, out.finish_reason,
                                   logprob=out.logprob, top_logprobs=out.top_logprobs,
                                   prompt_tokens=seq.num_prompt_tokens, completion_tokens=len(seq.output_ids)))

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        sink = self._sinks.get(seq.request_id)
        if event.finish_reason is not None:
            self._sinks.pop(seq.request_id, None)
            with self._live_lock:
                self._live.discard(seq.request_id)
        if sink is not None:
            sink(event)

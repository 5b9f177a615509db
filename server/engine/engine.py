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

from server.engine.block_manager import BlockManager
from server.engine.containment import run_isolated
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
from server.engine.slots import LOAD_FAILED, AdapterSlots
from server.engine.tenants import TenantState
from server.engine.types import AdapterRef, Residency, SamplingParams, TokenEvent

Sink = Callable[[TokenEvent], None]
logger = logging.getLogger(__name__)


class Engine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        base = Path(config.base)
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.eos_ids = read_generation_eos(base)
        self.model = load_model(base, config.quant, self.dtype, self.device, config.max_loras,
                                config.max_lora_rank)
        self.max_model_len = min(config.max_model_len, self.model.spec.max_position_embeddings)
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_bytes // kv_bytes_per_block(self.model, config.block_size))
        allocate_kv_cache(self.model, num_blocks, config.block_size)
        layers = self.model.lora_layers()
        self.fold = FoldManager(layers, config.fold, config.fold_window, config.fold_budget,
                                fold_dtype(config.quant, self.device, self.dtype))
        self.slots = AdapterSlots(self.model.lora_targets(), config.max_loras, config.max_cpu_loras, config.max_lora_rank,
                                  self.dtype, on_slot_change=self.fold.on_slot_change,
                                  max_cpu_bytes=config.max_cpu_lora_bytes, loader_threads=config.loader_threads,
                                  load_timeout_s=config.adapter_load_timeout_s)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_loras=config.max_loras)
        self.tenants = TenantState()
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
                    sampling: SamplingParams, tenant: str = "default") -> AsyncIterator[TokenEvent]:
        """Queue a request; returns its stream of events (call from inside the event loop).

        Raises PromptTooLong / DuplicateRequest / EngineStopped at once. Closing the iterator
        early (a client disconnect) aborts the request. `tenant` decides the fair share of slots
        and admission, and which adapters `tenant_residency(tenant)` shows.
        """
        if self._thread is None or not self._thread.is_alive():
            raise EngineStopped("the engine loop is not running; await engine.start() first")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._submit(request_id, prompt_ids, adapter, sampling,
                     lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), tenant)
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

    def pin(self, adapter: AdapterRef, tenant: str = "default") -> None:
        """`tenant` pins `adapter`: kept folded whenever it owns the traffic while any tenant pins it
        (and prefetched). Pins are per (tenant, adapter id)."""
        self.tenants.pin(tenant, adapter.id)
        self._command(("pin", adapter))

    def unpin(self, adapter_id: str, tenant: str = "default") -> None:
        """Remove `tenant`'s own pin; another tenant's pin on the same content stays."""
        self.tenants.unpin(tenant, adapter_id)
        self._command(("unpin", adapter_id))

    def tenant_residency(self, tenant: str) -> dict[str, Residency]:
        """Residency of the adapters `tenant` itself used or pinned since they became resident.

        `pinned` is the tenant's own pin. Identical content used only by another tenant is not
        shown, so residency reveals nothing across tenants; operator-wide views are in `stats()`.
        """
        tiers = self.slots.residency()
        return self.tenants.residency(tenant, tiers, self.slots.epoch, self.fold.folded_id)

    def forget_adapter(self, adapter_id: str, tenant: str | None = None) -> None:
        """After a delete: drop it from the host cache and its slot once no running sequence uses it.

        With `tenant`, only that tenant's pin and view go (the content may still be another
        tenant's); without, the adapter is forgotten for everyone."""
        self.tenants.forget(adapter_id, tenant)
        if tenant is None:
            self._command(("forget", adapter_id))
        else:
            self._command(("unpin", adapter_id))

    def stats(self) -> dict:
        sched = self.scheduler
        return {
            "adapters": self.slots.residency(),
            "slots": {str(s): self.slots.owner[s] for s in range(1, self.slots.num_slots + 1)},
            "slot_loads": self.slots.stats.loads,
            "slot_evictions": self.slots.stats.evictions,
            "disk_loads": self.slots.stats.disk_loads,
            "adapter_load_errors": self.slots.stats.load_errors,
            "adapter_load_timeouts": self.slots.stats.load_timeouts,
            "host_cache_bytes": self.slots.host_bytes,
            "fold": {"folded": self.fold.folded_id, "pinned": sorted(self.fold.pinned),
                     "bytes": self.fold.folded_bytes, "folds": self.fold.stats.folds,
                     "unfolds": self.fold.stats.unfolds},
            "waiting": len(sched.waiting),
            "running": len(sched.running),
            "preemptions": sched.num_preemptions,
            "kv_blocks_total": self.blocks.num_blocks,
            "kv_blocks_used": self.blocks.num_used,
            "kv_usage": self.blocks.num_used / self.blocks.num_blocks,
            "steps": self.num_steps,
            "generated_tokens": self.num_generated,
        }

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
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 tenants: list[str] | None = None) -> list[list[int]]:
        """Run prompts to completion through the same loop; returns each completion's token ids."""
        adapters = adapters if adapters is not None else [None] * len(prompts)
        tenants = tenants if tenants is not None else ["default"] * len(prompts)
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
        for rid, prompt, adapter, sp, tenant in zip(ids, prompts, adapters, params, tenants):
            tokens[rid] = []
            self._submit(rid, prompt, adapter, sp, sink(rid), tenant)
        if self._thread is not None and self._thread.is_alive():
            done.wait()
        else:
            while not done.is_set():
                self._drain_inbox()
                self.step()
        return [tokens[rid] for rid in ids]

    # -- the loop ---------------------------------------------------------------------------
    def _submit(self, request_id, prompt_ids, adapter, sampling, sink: Sink, tenant: str = "default") -> None:
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
                       text=IncrementalText(self.tokenizer, prompt_ids, sampling.stop), tenant=tenant)
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
                except Exception:  # noqa: BLE001 - a bug outside the run must not kill the loop
                    logger.exception("engine step failed outside the model run; failing the requests in flight")
                    self._fail_all("internal engine error")
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
                if arg.adapter is not None:
                    self.slots.request(arg.adapter)  # starts its residency epoch if it had none
                    self.tenants.used(arg.tenant, arg.adapter_id, self.slots.epoch.get(arg.adapter_id))
            elif kind == "abort":
                self._abort(arg)
            elif kind == "pin":
                self.slots.request(arg)
                self._sync_pin(arg.id)
            elif kind == "unpin":
                self._sync_pin(arg)
            elif kind == "forget":
                self._sync_pin(arg)
                self.fold.pinned.discard(arg)
                self.slots.forget(arg)

    def _sync_pin(self, adapter_id: str) -> None:
        """The fold manager's pin follows the tenants' pins: pinned while any tenant pins it."""
        for tenant in self.tenants.pinners(adapter_id):
            self.tenants.used(tenant, adapter_id, self.slots.epoch.get(adapter_id))
        if self.tenants.pinners(adapter_id):
            self.fold.pin(adapter_id)
        elif adapter_id in self.fold.pinned:
            self.fold.unpin(adapter_id)

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
        fold_slot = self._fold_for(batch)
        tokens = run_isolated(self.runner.run, batch, fold_slot)
        outputs = self.scheduler.postprocess(batch, tokens)
        self.num_steps += 1
        self.num_generated += sum(1 for out in outputs if out.token_id is not None)
        for out in outputs:
            self._emit(out)

    def _fold_for(self, batch) -> int | None:
        """The folded slot for this batch; a fold that fails (e.g. out of memory) runs unfolded."""
        try:
            return self.fold.update({e.seq.adapter_id: e.seq.slot for e in batch.entries})
        except Exception:  # noqa: BLE001 - folding is an optimisation, never a reason to fail
            logger.exception("fold failed; running unfolded")
            self.fold.unfold()
            return None

    def _fail_all(self, error: str) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "abort")
            self._send(seq, TokenEvent(seq.request_id, None, "", "abort", error=error,
                                       error_code="engine_error", error_status=500,
                                       prompt_tokens=seq.num_prompt_tokens,
                                       completion_tokens=len(seq.output_ids)))

    def _fail_unloadable(self) -> None:
        if not self.slots.failed:
            return
        failed = self.slots.take_failed()
        for seq in list(self.scheduler.waiting):
            error = failed.get(seq.adapter_id)
            if error is not None:
                self.scheduler.finish(seq, "abort")
                self._send(seq, TokenEvent(seq.request_id, None, "", "abort", error=error,
                                           error_code=LOAD_FAILED, error_status=503,
                                           prompt_tokens=seq.num_prompt_tokens))

    def _emit(self, out: StepOutput) -> None:
        seq = out.seq
        self._send(seq, TokenEvent(seq.request_id, out.token_id, out.text, out.finish_reason,
                                   logprob=out.logprob, top_logprobs=out.top_logprobs,
                                   prompt_tokens=seq.num_prompt_tokens, completion_tokens=len(seq.output_ids),
                                   error=out.error, error_code=out.error_code, error_status=out.error_status))

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        sink = self._sinks.get(seq.request_id)
        if event.finish_reason is not None:
            self._sinks.pop(seq.request_id, None)
            with self._live_lock:
                self._live.discard(seq.request_id)
        if sink is not None:
            sink(event)

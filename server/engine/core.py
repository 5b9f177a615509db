"""`EngineCore`: the synchronous engine. It owns the model and its parts and runs one step at a time.

`EngineCore(config)` loads the base once. Callers on any thread queue commands
(`server.engine.commands`) through `send`; the loop (`run_until`) applies them between steps with
one dispatch (`apply`) and steps while there is work. Each step reads like the design says:
`batch = scheduler.schedule(); tokens = runner.run(batch); scheduler.postprocess(batch, tokens)`,
with slot residency behind the scheduler's gate and fold decided just before the run. Nothing here
starts a thread or touches asyncio: `server.engine.engine.Engine` is the threaded front.
`generate` runs prompts to completion for tests and benchmarks.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.engine.block_manager import BlockManager
from server.engine.commands import Abort, AddRequest, Command, Forget, Pin, Sink, Unpin
from server.engine.config import EngineConfig
from server.engine.containment import run_isolated
from server.engine.detokenizer import IncrementalText
from server.engine.errors import AdapterLoadError, DuplicateRequest, PromptTooLong
from server.engine import fused
from server.engine.fold import FoldManager, fold_dtype, fold_min_rows, remaining_steps
from server.engine.lora import lora_dtype
from server.engine.prefix_cache import FOLDED, LORA, cache_key
from server.engine.loader import (
    allocate_kv_cache,
    kv_bytes_per_block,
    load_model,
    read_generation_eos,
    resolve_device_dtype,
)
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler, StepOutput
from server.engine.sequence import Sequence
from server.engine.slots import LOAD_FAILED, AdapterSlots
from server.engine.tenants import TenantState
from server.engine.types import AdapterRef, AdapterResidency, EngineStats, FoldView, SamplingParams, TokenEvent

logger = logging.getLogger(__name__)


class EngineCore:
    """The model, its parts and the step loop; `send` and the command methods are thread-safe."""

    tokenizer: Any
    max_model_len: int

    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        base = Path(config.base)
        fused.set_enabled(config.native_kernels)  # before the dtype: "auto" asks whether AMX runs
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype, config.quant)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        self.eos_ids = read_generation_eos(base)
        self.model = load_model(
            base, config.quant, self.dtype, self.device, config.max_loras, config.max_rank, config.lora_dtype
        )
        self.max_model_len = min(config.max_model_len, self.model.spec.max_position_embeddings)
        num_blocks = config.num_kv_blocks or max(
            1, config.kv_cache_bytes // kv_bytes_per_block(self.model, config.block_size)
        )
        allocate_kv_cache(self.model, num_blocks, config.block_size)
        layers = self.model.lora_layers()
        self.fold = FoldManager(
            layers,
            config.fold,
            config.fold_window,
            config.fold_budget,
            fold_dtype(config.quant, self.device, self.dtype),
            slice_bytes=config.fold_slice_bytes or None,
            min_rows=fold_min_rows(config.quant, self.device, self.dtype),
        )
        self.slots = AdapterSlots(
            self.model.lora_targets(),
            config.max_loras,
            config.max_cpu_loras,
            config.max_rank,
            lora_dtype(self.dtype, self.device),  # the host cache holds what the slots hold
            on_slot_change=self.fold.on_slot_change,
            max_cpu_bytes=config.max_cpu_lora_bytes,
            loader_threads=config.loader_threads,
            load_timeout_s=config.adapter_load_timeout_s,
        )
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.blocks,
            self.slots,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_loras=config.max_loras,
            weights_for=self._weights_for,
        )
        self.tenants = TenantState()
        self.runner = ModelRunner(
            self.model, config.block_size, self.max_model_len, self.device, self.dtype, Sampler(), self.slots.table
        )
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._live: set[str] = set()
        self._live_lock = threading.Lock()
        self._wake = threading.Event()
        self.num_steps = 0
        self.num_generated = 0

    # -- commands (any thread) --------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        """Stop a request; its KV blocks and slot pin are freed before the next step."""
        self.send(Abort(request_id))

    def pin(self, adapter: AdapterRef, tenant: str = "default") -> None:
        """`tenant` pins `adapter`: kept folded whenever it owns the traffic while any tenant pins it
        (and prefetched). Pins are per (tenant, adapter id)."""
        self.tenants.pin(tenant, adapter.id)
        self.send(Pin(adapter, tenant))

    def unpin(self, adapter_id: str, tenant: str = "default") -> None:
        """Remove `tenant`'s own pin; another tenant's pin on the same content stays."""
        self.tenants.unpin(tenant, adapter_id)
        self.send(Unpin(adapter_id, tenant))

    def forget_adapter(self, adapter_id: str, tenant: str | None = None) -> None:
        """After a delete: drop it from the host cache and its slot once no running sequence uses it.

        With `tenant`, only that tenant's pin and view go (the content may still be another
        tenant's); without, the adapter is forgotten for everyone."""
        self.tenants.forget(adapter_id, tenant)
        self.send(Forget(adapter_id, tenant))

    def tenant_residency(self, tenant: str) -> dict[str, AdapterResidency]:
        """Residency of the adapters `tenant` itself used or pinned since they became resident.

        `pinned` is the tenant's own pin. Identical content used only by another tenant is not
        shown, so residency reveals nothing across tenants; operator-wide views are in `stats()`.
        """
        return self.tenants.residency(tenant, self.slots.residency(), self.slots.epoch, self.fold.folded_id)

    def send(self, command: Command) -> None:
        self._inbox.put(command)
        self._wake.set()

    def stats(self) -> EngineStats:
        """A snapshot for the server's listings and metrics (any thread; a read between steps)."""
        sched, slots, fold = self.scheduler, self.slots, self.fold
        return EngineStats(
            waiting=len(sched.waiting),
            running=len(sched.running),
            adapters=slots.residency(),
            slots={s: slots.owner[s] for s in range(1, slots.num_slots + 1)},
            fold=FoldView(
                folded=fold.folded_id,
                pinned=tuple(sorted(fold.pinned)),
                bytes=fold.folded_bytes,
                folds=fold.stats.folds,
                unfolds=fold.stats.unfolds,
            ),
            slot_loads=slots.stats.loads,
            slot_evictions=slots.stats.evictions,
            disk_loads=slots.stats.disk_loads,
            adapter_load_errors=slots.stats.load_errors,
            adapter_load_timeouts=slots.stats.load_timeouts,
            host_cache_bytes=slots.host_bytes,
            preemptions=sched.num_preemptions,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            steps=self.num_steps,
            generated_tokens=self.num_generated,
            kv_blocks_cached=self.blocks.num_cached,
            prefix_cache_queries=self.blocks.cache_queries,
            prefix_cache_hits=self.blocks.cache_hits,
        )

    def close(self) -> None:
        self.slots.shutdown()

    # -- synchronous use ----------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        adapters: list[AdapterRef | None] | None = None,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        tenants: list[str] | None = None,
    ) -> list[list[int]]:
        """Run prompts to completion through the loop; returns each completion's token ids."""
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

        if not prompts:
            return []
        ids = [f"generate-{id(done)}-{i}" for i in range(len(prompts))]
        for rid, prompt, adapter, sp, tenant in zip(ids, prompts, adapters, params, tenants):
            tokens[rid] = []
            self._submit(rid, prompt, adapter, sp, sink(rid), tenant)
        self._wait(done)
        return [tokens[rid] for rid in ids]

    def _wait(self, done: threading.Event) -> None:
        """Run the loop here until `done` (the threaded front waits for its own loop instead)."""
        if not done.is_set():
            self.run_until(done.is_set)

    # -- the loop ---------------------------------------------------------------------------
    def _submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        adapter: AdapterRef | None,
        sampling: SamplingParams,
        sink: Sink,
        tenant: str = "default",
    ) -> None:
        """Check a request and queue it (raises PromptTooLong / AdapterLoadError / DuplicateRequest)."""
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
        seq = Sequence(
            request_id,
            prompt_ids,
            sampling,
            adapter=adapter,
            eos_ids=self.eos_ids,
            max_model_len=self.max_model_len,
            text=IncrementalText(self.tokenizer, prompt_ids, sampling.stop),
            tenant=tenant,
        )
        if self.config.enable_prefix_caching:
            seq.cache_key = cache_key(self.config.prefix_cache_scope, tenant, seq.adapter_id, sampling.cache_salt)
        self.send(AddRequest(seq, sink))

    def run_until(self, finished: Callable[[], bool]) -> None:
        """The loop: apply queued commands, step while there is work, sleep until woken otherwise.

        A step that raises is a bug: it fails the requests in flight and the loop goes on.
        """
        while not finished():
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
            self._delivered()

    def _delivered(self) -> None:
        """After each loop iteration (the step's and the commands' events were sent): a front that
        buffers its sinks delivers here (`Engine` batches them per event loop); nothing by default."""

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            self.apply(command)

    def apply(self, command: Command) -> None:
        """Apply one command (loop thread only)."""
        match command:
            case AddRequest(seq, sink):
                self._sinks[seq.request_id] = sink
                self.scheduler.add(seq)
                if seq.adapter is not None:
                    self.slots.request(seq.adapter)  # starts its residency epoch if it had none
                    self.tenants.used(seq.tenant, seq.adapter.id, self.slots.epoch.get(seq.adapter.id))
            case Abort(request_id):
                self._abort(request_id)
            case Pin(adapter, _tenant):
                self.slots.request(adapter)
                self._sync_pin(adapter.id)
            case Unpin(adapter_id, _tenant):
                self._sync_pin(adapter_id)
            case Forget(adapter_id, None):
                self._sync_pin(adapter_id)
                self.fold.forget(adapter_id)
                self.slots.forget(adapter_id)
            case Forget(adapter_id, _tenant):
                self._sync_pin(adapter_id)

    def _sync_pin(self, adapter_id: str) -> None:
        """The fold manager's pin follows the tenants' pins: pinned while any tenant pins it."""
        for tenant in self.tenants.pinners(adapter_id):
            self.tenants.used(tenant, adapter_id, self.slots.epoch.get(adapter_id))
        if self.tenants.pinners(adapter_id):
            self.fold.pin(adapter_id)
        elif adapter_id in self.fold.pinned:
            self.fold.unpin(adapter_id)

    def abort_all(self) -> None:
        """End every request in flight with finish_reason "abort" (the loop is stopping)."""
        self._drain_inbox()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._abort(seq.request_id)

    def _abort(self, request_id: str) -> None:
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._send(
                seq,
                TokenEvent(
                    request_id,
                    None,
                    "",
                    "abort",
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=len(seq.output_ids),
                ),
            )

    def step(self) -> None:
        """One engine iteration: residency, schedule, fold, run, postprocess, emit."""
        self.slots.poll()
        self._fail_unloadable()
        batch = self.scheduler.schedule()
        if not batch:
            self.slots.wait_for_loads(timeout=0.05)  # nothing runnable until an adapter arrives
            return
        fold_slot = self._fold_for(batch)
        self.scheduler.ran_under(batch, LORA if fold_slot is None else FOLDED)
        if not batch:
            return  # its only sequence met a fold change on cached blocks: readmitted next step
        tokens = run_isolated(self.runner.run, batch, fold_slot)
        outputs = self.scheduler.postprocess(batch, tokens)
        self.num_steps += 1
        self.num_generated += sum(1 for out in outputs if out.token_id is not None)
        for out in outputs:
            self._emit(out)

    def _weights_for(self, seq: Sequence) -> str:
        """The weights a sequence admitted now computes under: only the folded adapter's own
        sequences run on dense folded copies (and only in batches it owns; `ran_under` catches
        the rest). Base rows never run folded: a batch with base tokens takes the LoRA path."""
        folded = self.fold.folded_id
        return FOLDED if folded is not None and seq.adapter_id == folded else LORA

    def _fold_for(self, batch) -> int | None:
        """The folded slot for this batch; a fold that fails (e.g. out of memory) runs unfolded."""
        try:
            return self.fold.update(
                {e.seq.adapter_id: e.seq.slot for e in batch.entries}, remaining_steps(batch), batch.num_tokens
            )
        except Exception:  # noqa: BLE001 - folding is an optimisation, never a reason to fail
            logger.exception("fold failed; running unfolded")
            self.fold.unfold()
            return None

    def _fail_all(self, error: str) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "abort")
            self._send(
                seq,
                TokenEvent(
                    seq.request_id,
                    None,
                    "",
                    "abort",
                    error=error,
                    error_code="engine_error",
                    error_status=500,
                    prompt_tokens=seq.num_prompt_tokens,
                    completion_tokens=len(seq.output_ids),
                ),
            )

    def _fail_unloadable(self) -> None:
        failed = self.slots.take_failed()
        if not failed:
            return
        for seq in list(self.scheduler.waiting):
            error = failed.get(seq.adapter_id) if seq.adapter_id is not None else None
            if error is not None:
                self.scheduler.finish(seq, "abort")
                self._send(
                    seq,
                    TokenEvent(
                        seq.request_id,
                        None,
                        "",
                        "abort",
                        error=error,
                        error_code=LOAD_FAILED,
                        error_status=503,
                        prompt_tokens=seq.num_prompt_tokens,
                    ),
                )

    def _emit(self, out: StepOutput) -> None:
        seq = out.seq
        self._send(
            seq,
            TokenEvent(
                seq.request_id,
                out.token_id,
                out.text,
                out.finish_reason,
                logprob=out.logprob,
                top_logprobs=out.top_logprobs,
                prompt_tokens=seq.num_prompt_tokens,
                completion_tokens=len(seq.output_ids),
                cached_tokens=seq.num_cached_tokens or 0,
                error=out.error,
                error_code=out.error_code,
                error_status=out.error_status,
            ),
        )

    def _send(self, seq: Sequence, event: TokenEvent) -> None:
        sink = self._sinks.get(seq.request_id)
        if event.finish_reason is not None:
            self._sinks.pop(seq.request_id, None)
            with self._live_lock:
                self._live.discard(seq.request_id)
        if sink is not None:
            sink(event)

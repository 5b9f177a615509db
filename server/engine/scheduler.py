"""Continuous batching: which sequences run this step, with how many tokens each.

Every step the scheduler first continues the running sequences (one decode token each, or the
next chunk of an unfinished prefill), preempting the most recent arrivals by recompute when KV
blocks run out, then admits waiting sequences while the limits on running sequences and tokens
per step allow and their adapter holds a device slot. `postprocess` records the sampled tokens
and releases everything a finished sequence held. No tensors live here.

Tenants share fairly (see fair_share.py): the waiting queue is admitted round-robin across
tenants (FIFO within a tenant), and while another tenant waits for an adapter slot, a tenant
already holding `ceil(max_loras / active tenants)` slots gets no further one; and a tenant that
took every slot before others came gives one back per step (preempted by recompute) while another
tenant's ready adapter finds every slot pinned.

Prefix caching (block_manager.py): a sequence admitted with no blocks first takes the cached
blocks of its longest cached prefix and computes only the rest; its full blocks are registered
as they complete. A waiting sequence whose next uncached block another running sequence is
computing right now waits a step rather than compute it twice (so `n` samples of one prompt, or
a burst of chats on one system prompt, prefill the shared part once). A preempted sequence drops
its references like any other and may hit its own blocks when it is readmitted.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.block_manager import BlockManager
from server.engine.fair_share import SlotShare, round_robin, slot_victims
from server.engine.prefix_cache import LORA
from server.engine.sequence import Sequence, SeqStatus

logger = logging.getLogger(__name__)


class AdapterGate(Protocol):
    """The scheduler's view of adapter residency (implemented by `AdapterSlots`)."""

    def acquire(self, seq: Sequence) -> bool:
        """Pin a device slot for seq's adapter and set `seq.slot`; False while it is not ready."""

    def release(self, seq: Sequence) -> None:
        """Unpin the slot `seq` holds (no-op when it holds none)."""

    def waits_for_slot(self, seq: Sequence) -> bool:
        """Whether seq's adapter is ready to go into a slot but every slot is pinned."""

    # Optional: `keep_resident(adapter_ids)`, called before admission with the adapters the waiting
    # sequences need, so evictions spare them (AdapterSlots implements it).


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step (= seq.num_computed before the step)
    num_new: int  # tokens computed this step
    hit: int = 0  # tokens taken from the prefix cache at this step's admission

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_new == self.seq.num_tokens


@dataclass
class Batch:
    entries: list[ScheduledSeq] = field(default_factory=list)
    fresh_blocks: list[int] = field(default_factory=list)  # newly allocated: zeroed before the run
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (src, dst, rows): prompt tails, after zeroing

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new for e in self.entries)


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int | None
    text: str
    finish_reason: str | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None  # with finish_reason "abort": this sequence alone failed
    error_code: str | None = None
    error_status: int | None = None


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        gate: AdapterGate,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_loras: int | None = None,
        weights_for: Callable[[Sequence], str] | None = None,
    ):
        """Args:
        max_loras: device slots shared by the tenants; None turns the per-tenant slot share off.
        weights_for: the weights (prefix_cache.LORA or FOLDED) a sequence admitted now will
            compute under, part of its blocks' identities; LORA when None.
        """
        self.blocks = blocks
        self.weights_for = weights_for or (lambda seq: LORA)
        self.max_loras = max_loras
        self._last_tenant: str | None = None  # round-robin position across steps
        self.gate = gate
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_fair_preemptions = 0  # of those, to give a starved tenant an adapter slot

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.max_num_batched_tokens
        self._rebalance_slots()
        preempted = self._continue_running(batch, budget)
        budget -= batch.num_tokens
        if not preempted:
            self._admit_waiting(batch, budget)
        batch.fresh_blocks = self.blocks.take_fresh()
        batch.copies = self.blocks.take_copies()
        return batch

    def _continue_running(self, batch: Batch, budget: int) -> bool:
        queue = deque(sorted(self.running, key=lambda s: s.seq_id))
        kept: list[Sequence] = []
        preempted = False
        while queue:
            seq = queue.popleft()
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if num_new <= 0:
                kept.append(seq)
                continue
            end = seq.num_computed + num_new
            while not self.blocks.can_cover(seq, end) and queue:
                self._preempt(queue.pop())  # the latest arrival gives its blocks back
                preempted = True
            if not self.blocks.can_cover(seq, end):
                if not kept and not batch.entries and self.blocks.num_used == len(seq.block_table):
                    self._finish(seq, "length")  # alone and still too big for the whole cache
                else:
                    self._preempt(seq)
                    preempted = True
                continue
            self.blocks.allocate(seq, end)
            batch.entries.append(ScheduledSeq(seq, seq.num_computed, num_new))
            budget -= num_new
            kept.append(seq)
        self.running = kept
        return preempted

    def _admit_waiting(self, batch: Batch, budget: int) -> None:
        admitted: set[int] = set()
        keep = getattr(self.gate, "keep_resident", None)  # optional: a gate may ignore what waits
        if keep is not None:
            keep(frozenset(s.adapter_id for s in self.waiting if s.adapter_id is not None))
        share = SlotShare(self.running, self.waiting, self.max_loras)
        pending: set[bytes] | None = None  # blocks running prefills are computing, built on first use
        for seq in round_robin(self.waiting, self._last_tenant):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not share.allows(seq):
                continue  # its tenant holds its fair share of slots while another tenant waits
            if seq.cache_key is not None:
                if pending is None:
                    pending = {h for s in self.running for h in self.blocks.pending(s)}
                if self._computing_elsewhere(seq, pending):
                    continue  # its next block is being computed now: hit it next step instead
            if not self.gate.acquire(seq):
                continue  # adapter still loading or no free slot: others go ahead
            hit = self.blocks.match_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            end = seq.num_computed + num_new
            if not self.blocks.can_cover(seq, end):
                self.blocks.free(seq)  # hands the hit blocks back (they stay cached)
                seq.num_computed = 0
                self.gate.release(seq)
                break  # out of KV memory: admit nobody else this step
            if seq.num_cached_tokens is None:  # first admission: what usage and the hit rate report
                seq.num_cached_tokens = hit
                self.blocks.count_lookup(seq.num_prompt_tokens, hit)
            self.blocks.allocate(seq, end)
            if pending is not None:
                pending.update(self.blocks.pending(seq))
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.entries.append(ScheduledSeq(seq, seq.num_computed, num_new, hit))
            budget -= num_new
            admitted.add(seq.seq_id)
            share.admitted(seq)
            self._last_tenant = seq.tenant
        if admitted:
            self.waiting = deque(s for s in self.waiting if s.seq_id not in admitted)

    def _rebalance_slots(self) -> None:
        """Preempt one over-share tenant's sequences on one adapter when another tenant's ready
        adapter finds every slot pinned (see `fair_share.slot_victims`)."""
        victims = slot_victims(self.running, self.waiting, self.max_loras, self.gate.waits_for_slot)
        for seq in sorted(victims, key=lambda s: -s.seq_id):  # appendleft: keep their FIFO order
            self.running.remove(seq)
            self._preempt(seq)
            self.num_fair_preemptions += 1

    def _computing_elsewhere(self, seq: Sequence, pending: set[bytes]) -> bool:
        """Whether `seq`'s first uncached prompt block is one a running sequence is computing.

        Identities include the scope, so this only ever waits on the same tenant's (or, with the
        global scope, the deployment's) own requests."""
        if seq.block_table or not seq.cache_lookup:
            return False
        weights = self.weights_for(seq)
        if weights != seq.weights:
            seq.weights, seq.block_hashes = weights, []  # identities name the weights
        if not pending:
            return False
        max_blocks = (seq.num_tokens - 1) // self.blocks.block_size
        for identity in self.blocks.hashes(seq, max_blocks):
            if not self.blocks.is_cached(identity):
                return identity in pending
        if seq.num_tokens != seq.num_prompt_tokens:
            return False
        tail = self.blocks.tail_identity(seq)
        return not self.blocks.has_tail(tail) and tail in pending

    def ran_under(self, batch: Batch, weights: str) -> None:
        """This step computes under `weights` (the fold was decided after admission).

        A sequence whose identities name other weights registers nothing from the first position
        computed now on. One that was just admitted onto cached blocks of the other weights would
        mix the two in one cache: it leaves the batch and is readmitted next step without a
        lookup, computing its whole prompt under the weights it then meets (once, so a fold that
        flaps with the traffic cannot hold it back)."""
        kept = []
        for e in batch.entries:
            seq = e.seq
            if seq.weights != weights and e.hit:
                batch.copies = [c for c in batch.copies if c[1] not in seq.block_table]
                self._bounce(seq, weights)
                continue
            if seq.weights != weights:
                seq.cache_limit = min(seq.cache_limit, e.start)
            kept.append(e)
        batch.entries = kept

    def _bounce(self, seq: Sequence, weights: str) -> None:
        self.blocks.count_lookup(-seq.num_prompt_tokens, -(seq.num_cached_tokens or 0))  # counted again
        self.blocks.free(seq)
        self.gate.release(seq)
        seq.num_computed = 0
        seq.num_cached_tokens = None
        seq.cache_lookup = False
        seq.weights, seq.block_hashes = weights, []
        seq.status = SeqStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: drop the cache and the slot pin, go back to the head of the queue."""
        self.blocks.free(seq)
        self.gate.release(seq)
        seq.num_computed = 0
        seq.cache_limit = Sequence.cache_limit  # recomputed from scratch under whatever weights then
        seq.tail_registered = False
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.blocks.free(seq)
        self.gate.release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)

    def postprocess(self, batch: Batch, sampled: list) -> list[StepOutput]:
        """Advance each scheduled sequence; `sampled[i]` is entry i's token (or a
        `SampledToken`-like object with token_id/logprob/top_logprobs), None when not sampling."""
        outputs = []
        for entry, sample in zip(batch.entries, sampled):
            seq = entry.seq
            if seq.status is not SeqStatus.RUNNING:
                continue
            if getattr(sample, "error_code", None) is not None:
                # this sequence alone failed (non-finite logits, a failed run): end it, keep the rest
                outputs.append(
                    StepOutput(
                        seq,
                        None,
                        "",
                        "abort",
                        error=sample.error,
                        error_code=sample.error_code,
                        error_status=sample.error_status,
                    )
                )
                self._finish(seq, "abort")
                continue
            seq.num_computed = entry.start + entry.num_new
            self.blocks.register(seq)
            if sample is None:
                continue
            token = sample if isinstance(sample, int) else sample.token_id
            try:
                text, reason = seq.append_token(token)
            except Exception:  # noqa: BLE001 - e.g. detokenizing; ends this sequence only
                logger.exception("recording a token failed for request %s", seq.request_id)
                outputs.append(
                    StepOutput(
                        seq,
                        None,
                        "",
                        "abort",
                        error="internal engine error",
                        error_code="engine_error",
                        error_status=500,
                    )
                )
                self._finish(seq, "abort")
                continue
            out = StepOutput(seq, token, text, reason)
            if not isinstance(sample, int):
                out.logprob, out.top_logprobs = sample.logprob, sample.top_logprobs
            outputs.append(out)
            if reason is not None:
                self._finish(seq, reason)
        return outputs

    def abort(self, request_id: str) -> Sequence | None:
        """Remove a request wherever it is; its blocks and slot pin are released at once."""
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                if seq.status is SeqStatus.WAITING:
                    self.waiting.remove(seq)
                self._finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence from outside (e.g. its adapter failed to load)."""
        if seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.status is not SeqStatus.FINISHED:
            self._finish(seq, reason)

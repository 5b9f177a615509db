"""Adapter residency: device slots <- host cache <- disk, behind the scheduler's `AdapterGate`.

`acquire(seq)` pins a device slot for the sequence's adapter when it is resident (writing it from
the host cache into the slot tensors if needed, evicting the least recently used unpinned slot
whose adapter no waiting sequence needs, see `keep_resident`, else the least recently used one);
when the adapter is only on disk it starts a background read and answers "not yet", so the rest
of the batch keeps running. A slot pinned by a running sequence is never evicted. The host cache
is LRU-bounded in count and in bytes. Nothing here decides what runs; `SlotTable` is the little
state the runner reads.

Loads are isolated from each other: a small pool of loader threads reads adapters in parallel,
and a load running longer than its deadline fails that adapter alone (its requests end with
`adapter_load_failed`, 503) while the others keep loading. Failure messages name the adapter
id only; paths and exception details go to the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from server.engine.errors import AdapterLoadError
from server.engine.lora import MultiLoraLinear
from server.engine.mixes import read_weights
from server.engine.sequence import NO_SLOT, Sequence
from server.engine.types import AdapterRef

logger = logging.getLogger(__name__)
LOAD_FAILED = "adapter_load_failed"


@dataclass
class SlotTable:
    """What the runner needs per step: each slot's max rank and a version of all slot contents."""

    ranks: list[int]
    version: int = 0  # bumps whenever any slot's contents change


@dataclass
class HostAdapter:
    """An adapter in host memory, ready to copy: module path -> (A (r, in), B^T (r, out), scaling).

    B is transposed here, in the loader thread, into the layout the slots keep; the scaling is
    applied while writing the slot.
    """

    id: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    max_rank: int
    nbytes: int = 0


def read_host_adapter(
    ref: AdapterRef, targets: dict[str, tuple[MultiLoraLinear, str]], max_rank: int, dtype: torch.dtype
) -> HostAdapter:
    """Read a PEFT directory and shape it for the slots (runs in the loader thread)."""
    try:
        weights = read_weights(ref)  # a mix is composed from its parts here
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("adapter %s: cannot read %s: %r", ref.id, ref.path, exc)
        raise AdapterLoadError(f"adapter {ref.id}: its stored files cannot be read") from exc
    modules, nbytes = {}, 0
    for path, module in weights.modules.items():
        if path not in targets:
            raise AdapterLoadError(f"adapter {ref.id}: module {path!r} is not a linear layer of the base")
        layer, part = targets[path]
        out_features = layer.part_out
        if module.rank > max_rank:
            raise AdapterLoadError(f"adapter {ref.id}: rank {module.rank} > max_rank {max_rank}")
        if tuple(module.A.shape) != (module.rank, layer.in_features) or tuple(module.B.shape) != (
            out_features,
            module.rank,
        ):
            raise AdapterLoadError(
                f"adapter {ref.id}: {path} has shapes A{tuple(module.A.shape)} B{tuple(module.B.shape)}"
            )
        A = module.A.to(dtype).contiguous()
        Bt = module.B.to(dtype).t().contiguous()  # (r, out)
        modules[path] = (A, Bt, module.scaling)
        nbytes += A.numel() * A.element_size() + Bt.numel() * Bt.element_size()
    return HostAdapter(ref.id, modules, weights.max_rank, nbytes)


@dataclass
class SlotStats:
    loads: int = 0  # host -> slot writes
    evictions: int = 0  # slots overwritten while holding another adapter
    disk_loads: int = 0
    load_errors: int = 0
    load_timeouts: int = 0


class AdapterSlots:
    def __init__(
        self,
        targets: dict[str, tuple[MultiLoraLinear, str]],
        num_slots: int,
        max_cpu: int,
        max_rank: int,
        dtype: torch.dtype,
        on_slot_change=None,
        *,
        max_cpu_bytes: int | None = None,
        loader_threads: int = 1,
        load_timeout_s: float | None = None,
    ):
        """Args:
        targets: PEFT module path -> (wrapped layer, part name), from `CausalLM.lora_targets()`.
        max_cpu_bytes: bytes the host cache may hold (the newest entry always stays); None = no bound.
        loader_threads: adapters read from disk in parallel.
        load_timeout_s: a load running longer fails its adapter's requests; None = no deadline.
        """
        self.targets = targets
        self.layers: dict[int, MultiLoraLinear] = {id(layer): layer for layer, _ in targets.values()}
        self.num_slots, self.max_cpu, self.max_rank, self.dtype = num_slots, max_cpu, max_rank, dtype
        self.table = SlotTable(ranks=[0] * (num_slots + 1))
        self.owner: list[str | None] = [None] * (num_slots + 1)  # slot -> adapter id
        self.pins = [0] * (num_slots + 1)
        self.slot_of: dict[str, int] = {}
        self.recency: OrderedDict[int, None] = OrderedDict((s, None) for s in range(1, num_slots + 1))
        self.host: OrderedDict[str, HostAdapter] = OrderedDict()
        self.max_cpu_bytes, self.load_timeout_s = max_cpu_bytes, load_timeout_s
        self.host_bytes = 0
        self.loading: dict[str, Future] = {}
        self._started: dict[str, float] = {}  # adapter id -> when its read began in a loader thread
        self._abandoned: dict[str, Future] = {}  # loads past their deadline, still holding a thread
        self.failed: dict[str, str] = {}
        self._epochs = 0
        self.epoch: dict[str, int] = {}  # adapter id -> which residency it is in (see Engine.tenant_residency)
        self.forgotten: set[str] = set()
        self.stats = SlotStats()
        self.on_slot_change = on_slot_change  # fold manager hook: slot contents changed
        self._pool = ThreadPoolExecutor(max_workers=max(1, loader_threads), thread_name_prefix="adapter-loader")
        self._lock = threading.Lock()  # guards `host` against readers of stats()
        self._wanted: frozenset[str] = frozenset()  # adapters waiting sequences need (keep_resident)

    # -- AdapterGate ----------------------------------------------------------------------
    def acquire(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            seq.slot = 0
            return True
        aid = seq.adapter.id
        slot = self.slot_of.get(aid)
        if slot is None:
            host = self.host.get(aid)
            if host is None:
                self.request(seq.adapter)
                return False
            slot = self._victim()
            if slot is None:
                return False  # every slot is pinned by running sequences
            self._write(slot, host)
        self.pins[slot] += 1
        self.recency.move_to_end(slot)
        with self._lock:
            if aid in self.host:  # a slot may outlive its host copy
                self.host.move_to_end(aid)
        seq.slot = slot
        return True

    def release(self, seq: Sequence) -> None:
        slot, seq.slot = seq.slot, NO_SLOT
        if slot <= 0:
            return
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and self.owner[slot] in self.forgotten:
            self.forgotten.discard(self.owner[slot])
            self._clear(slot)

    def waits_for_slot(self, seq: Sequence) -> bool:
        """Ready in the host cache, in no slot, and every slot is pinned (the scheduler may then
        preempt an over-share tenant, see fair_share.slot_victims)."""
        if seq.adapter is None or seq.adapter.id in self.slot_of or seq.adapter.id not in self.host:
            return False
        return self._victim() is None

    def keep_resident(self, adapter_ids: frozenset[str]) -> None:
        """The adapters waiting sequences need: an eviction takes another unpinned slot first, so a
        waiting sequence finds its adapter still in a slot instead of stalling on a rewrite."""
        self._wanted = adapter_ids

    # -- loading --------------------------------------------------------------------------
    def request(self, ref: AdapterRef) -> None:
        """Start reading `ref` from disk unless it is resident, loading or failed."""
        if ref.id in self.host or ref.id in self.loading or ref.id in self.failed:
            return
        stuck = self._abandoned.get(ref.id)
        if stuck is not None:
            if not stuck.done():
                # retrying would only tie up another loader thread with the same slow adapter
                self.failed[ref.id] = f"adapter {ref.id}: an earlier load of it has not finished"
                return
            del self._abandoned[ref.id]
        self.forgotten.discard(ref.id)
        if ref.id not in self.epoch:
            self._epochs += 1
            self.epoch[ref.id] = self._epochs
        self.loading[ref.id] = self._pool.submit(self._read, ref)

    def _read(self, ref: AdapterRef) -> HostAdapter:
        self._started[ref.id] = time.monotonic()  # the deadline counts from here, not from the queue
        return read_host_adapter(ref, self.targets, self.max_rank, self.dtype)

    def poll(self) -> None:
        """Move finished disk reads into the host cache (called by the engine loop each step);
        fail loads that passed their deadline."""
        now = time.monotonic()
        for aid, future in list(self.loading.items()):
            if not future.done():
                started = self._started.get(aid)
                if self.load_timeout_s is not None and started is not None and now - started > self.load_timeout_s:
                    # The thread cannot be interrupted; its result is dropped when it ends.
                    self._abandoned[aid] = self.loading.pop(aid)
                    self._started.pop(aid, None)
                    self.failed[aid] = f"adapter {aid}: loading took longer than {self.load_timeout_s:g} s"
                    self.stats.load_timeouts += 1
                    logger.warning("adapter %s: load passed its %s s deadline", aid, self.load_timeout_s)
                continue
            del self.loading[aid]
            self._started.pop(aid, None)
            if aid in self.forgotten:
                self.forgotten.discard(aid)
                self._maybe_gone(aid)
                continue
            try:
                host = future.result()
            except AdapterLoadError as exc:
                self.failed[aid] = str(exc)
                self.stats.load_errors += 1
                continue
            except Exception:  # noqa: BLE001 - any failure becomes the request's error
                logger.exception("adapter %s: load failed", aid)
                self.failed[aid] = f"adapter {aid}: could not be loaded"
                self.stats.load_errors += 1
                continue
            self.stats.disk_loads += 1
            self._cache(host)

    def _cache(self, host: HostAdapter) -> None:
        """Insert into the host cache, evicting LRU entries past the count or byte bound."""
        evicted = []
        with self._lock:
            self.host[host.id] = host
            self.host_bytes += host.nbytes
            while len(self.host) > 1 and (
                len(self.host) > self.max_cpu
                or (self.max_cpu_bytes is not None and self.host_bytes > self.max_cpu_bytes)
            ):
                _, old = self.host.popitem(last=False)
                self.host_bytes -= old.nbytes
                evicted.append(old.id)
        for aid in evicted:
            self._maybe_gone(aid)

    def _maybe_gone(self, aid: str) -> None:
        """An adapter no longer held anywhere leaves its residency epoch."""
        if aid not in self.host and aid not in self.slot_of and aid not in self.loading and aid not in self.failed:
            self.epoch.pop(aid, None)

    def take_failed(self) -> dict[str, str]:
        """The loads that failed since the last call (adapter id -> message); they may be retried."""
        failed, self.failed = self.failed, {}
        for aid in failed:
            self._maybe_gone(aid)
        return failed

    def wait_for_loads(self, timeout: float) -> None:
        if self.loading:
            wait(list(self.loading.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    # -- slots ----------------------------------------------------------------------------
    def _victim(self) -> int | None:
        for slot in self.recency:  # least recently used first; empty slots are never touched
            if self.owner[slot] is None:
                return slot
        unpinned = [slot for slot in self.recency if self.pins[slot] == 0]
        for slot in unpinned:  # least recently used among those no waiting sequence needs
            if self.owner[slot] not in self._wanted:
                return slot
        return unpinned[0] if unpinned else None

    def _write(self, slot: int, host: HostAdapter) -> None:
        evicted = self.owner[slot]
        if evicted is not None:
            self.stats.evictions += 1
            del self.slot_of[evicted]
        per_layer: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        for path, pair in host.modules.items():
            layer, part = self.targets[path]
            per_layer.setdefault(id(layer), {})[part] = pair
        for key, layer in self.layers.items():
            if key in per_layer or layer.slot_rank[slot]:
                layer.load_slot(slot, per_layer.get(key, {}))
        self.owner[slot] = host.id
        self.slot_of[host.id] = slot
        self.table.ranks[slot] = host.max_rank
        self.table.version += 1
        self.stats.loads += 1
        if evicted is not None:
            self._maybe_gone(evicted)
        if self.on_slot_change:
            self.on_slot_change(slot)

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            if layer.slot_rank[slot]:
                layer.load_slot(slot, {})
        aid = self.owner[slot]
        if aid is not None:
            self.slot_of.pop(aid, None)
        self.owner[slot] = None
        if aid is not None:
            self._maybe_gone(aid)
        self.table.ranks[slot] = 0
        self.table.version += 1
        if self.on_slot_change:
            self.on_slot_change(slot)

    def forget(self, adapter_id: str) -> None:
        """Drop an adapter everywhere once no running sequence uses it."""
        with self._lock:
            host = self.host.pop(adapter_id, None)
            if host is not None:
                self.host_bytes -= host.nbytes
        self.failed.pop(adapter_id, None)
        if adapter_id in self.loading:
            self.forgotten.add(adapter_id)
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            if self.pins[slot] == 0:
                self._clear(slot)
            else:
                self.forgotten.add(adapter_id)
        self._maybe_gone(adapter_id)

    def residency(self) -> dict[str, str]:
        """adapter id -> "device" | "host" | "loading" | "failed"."""
        with self._lock:
            out = {aid: "host" for aid in self.host}
        out.update({aid: "loading" for aid in list(self.loading)})
        out.update({aid: "failed" for aid in list(self.failed)})
        out.update({aid: "device" for aid in list(self.slot_of)})
        return out

    def check(self) -> None:
        """Invariants: pins never negative; slot_of and owner agree."""
        assert all(p >= 0 for p in self.pins), self.pins
        for aid, slot in self.slot_of.items():
            assert self.owner[slot] == aid

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""Routing simulator: which replica should serve a request for adapter X?

Replays a Zipf-distributed adapter workload against N engine replicas (S adapter slots each) under
three routers and reports slot hit rate, cold loads per second, load imbalance and queueing delay:

- `ray`: Ray Serve's multiplexed routing as Ray 2.x implements it (request_router.py
  `apply_multiplex_routing` + pow_2_router.py): the candidates are the replicas that report the model
  id; if there are none, or the first try found them full, the replicas holding the fewest models;
  among the candidates two are drawn at random and the one with the shorter queue that still accepts
  (queue < max_ongoing_requests) wins; if none accepts, the request waits and retries. Each replica
  keeps a local LRU of `max_num_models_per_replica` (= its slots).
- `p2c`: power of two choices over all replicas, no affinity (the floor).
- `hrw`: rendezvous (highest-random-weight) hashing with bounded load: each adapter ranks every
  replica by hash(adapter, replica); the request goes to the less-loaded of its top-k replicas if
  that one accepts, else walks down its ranking to the first replica that accepts. Base-only
  requests go to the least-loaded replica.

Service model (per replica, continuous batching): a step costs `step_ms + seq_ms * running` plus
`load_ms` for every adapter that step had to bring into a slot; every running sequence gains one
token per step. A request can join the batch only if its adapter is in a slot or a slot can be freed
(least recently used, and not used by a running sequence). Queueing delay is arrival -> first step.

This is a model, not a measurement: numbers compare routers under the same assumptions.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import random
import statistics
import sys
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROUTERS = ("ray", "p2c", "hrw", "bounded")


@dataclass(frozen=True)
class SimConfig:
    adapters: int = 1000
    zipf_s: float = 1.0
    base_share: float = 0.05  # fraction of requests with no adapter
    replicas: int = 16
    slots: int = 8  # adapter slots per replica (= Ray's max_num_models_per_replica)
    max_running: int = 16  # sequences in one replica's batch
    max_ongoing: int = 32  # Ray's max_ongoing_requests: running + queued on a replica
    step_ms: float = 20.0
    seq_ms: float = 1.0
    load_ms: float = 40.0  # host cache -> device slot
    mean_tokens: float = 64.0  # generated tokens per request (geometric)
    load: float = 0.85  # arrival rate as a fraction of the nominal capacity
    duration_s: float = 120.0
    warmup_s: float = 20.0  # requests arriving before this are not counted
    hrw_k: int = 2
    bound: float = 1.25  # `bounded`: a holder is used while its load <= bound x mean load (+1)
    seed: int = 0

    def __post_init__(self):
        if self.slots < 1 or self.replicas < 1 or self.adapters < 1:
            raise ValueError("adapters, replicas and slots must be >= 1")
        if not 0 < self.load:
            raise ValueError("load must be > 0")
        if self.warmup_s >= self.duration_s:
            raise ValueError("warmup_s must be < duration_s")

    def capacity_rps(self) -> float:
        """Requests/s all replicas finish at a full batch, ignoring cold loads."""
        step_s = (self.step_ms + self.seq_ms * self.max_running) / 1000.0
        return self.replicas * self.max_running / (self.mean_tokens * step_s)


@dataclass
class Request:
    rid: int
    adapter: int | None
    tokens: int
    arrival: float
    start: float | None = None
    replica: int | None = None
    slot_hit: bool | None = None
    tried_holders: bool = False


@dataclass
class Replica:
    """One engine: a local queue, a running batch and `slots` adapter slots in LRU order."""

    index: int
    slots: int
    queue: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    resident: OrderedDict = field(default_factory=OrderedDict)  # adapter -> None, LRU first
    busy: bool = False
    served: int = 0
    cold_loads: int = 0

    @property
    def ongoing(self) -> int:
        return len(self.queue) + len(self.running)

    def has_free_slot(self) -> bool:
        """Whether a new adapter could take a slot now without waiting for a sequence to finish."""
        needed = {q.adapter for q, _ in self.running} | {q.adapter for q in self.queue}
        return len(self.resident) < self.slots or any(a not in needed for a in self.resident)

    def slot_for(self, adapter: int, in_use: set[int]) -> bool | None:
        """True: already resident (a hit); False: loaded now (evicting the LRU unused one); None: no slot."""
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return True
        if len(self.resident) >= self.slots:
            victim = next((a for a in self.resident if a not in in_use), None)
            if victim is None:
                return None
            del self.resident[victim]
        self.resident[adapter] = None
        return False


def zipf_weights(n: int, s: float) -> list[float]:
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def hrw_rank(adapter: int, replicas: int) -> list[int]:
    """Replicas ordered by rendezvous weight for `adapter` (stable as replicas come and go)."""

    def weight(r: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{adapter}:{r}".encode(), digest_size=8).digest(), "big")

    return sorted(range(replicas), key=weight, reverse=True)


class Router:
    """Picks a replica for a request, or None to keep it waiting at the router."""

    def __init__(self, kind: str, cfg: SimConfig, replicas: list[Replica], rng: random.Random):
        if kind not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, not {kind!r}")
        self.kind, self.cfg, self.replicas, self.rng = kind, cfg, replicas, rng
        self._ranks: dict[int, list[int]] = {}

    def accepts(self, r: Replica) -> bool:
        return r.ongoing < self.cfg.max_ongoing

    def pick(self, req: Request) -> Replica | None:
        if req.adapter is None:
            return self._least_loaded(self.replicas)
        return getattr(self, f"_{self.kind}")(req)

    def _least_loaded(self, candidates: list[Replica]) -> Replica | None:
        open_ = [r for r in candidates if self.accepts(r)]
        return min(open_, key=lambda r: (r.ongoing, self.rng.random())) if open_ else None

    def _two_choices(self, candidates: list[Replica]) -> Replica | None:
        chosen = self.rng.sample(candidates, min(2, len(candidates)))
        return self._least_loaded(chosen)

    def _p2c(self, req: Request) -> Replica | None:
        chosen = self.rng.sample(self.replicas, min(2, len(self.replicas)))
        open_ = [r for r in chosen if self.accepts(r)]
        return min(open_, key=lambda r: (not r.has_free_slot(), r.ongoing)) if open_ else None

    def _ray(self, req: Request) -> Replica | None:
        # Ray: holders of the model first; if none, or the holders were already tried and full,
        # the replicas with the fewest models. (The matching timeout, >= 1 s, only widens the
        # fallback to all replicas, which under full LRUs is the same set.)
        holders = [r for r in self.replicas if req.adapter in r.resident]
        if holders and not req.tried_holders:
            req.tried_holders = True
            chosen = self._two_choices(holders)
            if chosen is not None:
                return chosen
        fewest = min(len(r.resident) for r in self.replicas)
        return self._two_choices([r for r in self.replicas if len(r.resident) == fewest])

    def _hrw(self, req: Request) -> Replica | None:
        rank = self._ranks.get(req.adapter)
        if rank is None:
            rank = self._ranks[req.adapter] = hrw_rank(req.adapter, len(self.replicas))
        top = [self.replicas[i] for i in rank[: self.cfg.hrw_k]]
        chosen = self._least_loaded(top)
        if chosen is not None:
            return chosen
        return next((self.replicas[i] for i in rank[self.cfg.hrw_k :] if self.accepts(self.replicas[i])), None)

    def _bounded(self, req: Request) -> Replica | None:
        # Affinity with bounded load: the least-loaded replica holding the adapter, as long as its
        # load stays within `bound` x the mean (consistent hashing with bounded loads' rule);
        # otherwise two random choices over all replicas, preferring one with a free slot.
        mean = sum(r.ongoing for r in self.replicas) / len(self.replicas)
        limit = self.cfg.bound * mean + 1
        holders = [r for r in self.replicas if req.adapter in r.resident and r.ongoing <= limit]
        chosen = self._least_loaded(holders)
        if chosen is not None:
            return chosen
        chosen = self.rng.sample(self.replicas, min(2, len(self.replicas)))
        open_ = [r for r in chosen if self.accepts(r)]
        return min(open_, key=lambda r: (not r.has_free_slot(), r.ongoing)) if open_ else None


def simulate(cfg: SimConfig, router_kind: str) -> dict:
    """Run one router over the workload; returns the figures for requests after the warm-up."""
    rng = random.Random(cfg.seed)
    work_rng = random.Random(cfg.seed + 1)  # the same arrivals for every router
    replicas = [Replica(i, cfg.slots) for i in range(cfg.replicas)]
    router = Router(router_kind, cfg, replicas, rng)
    weights = zipf_weights(cfg.adapters, cfg.zipf_s)
    rate = cfg.load * cfg.capacity_rps()
    events: list = []  # (time, order, kind, payload)
    order = 0

    def push(t: float, kind: str, payload) -> None:
        nonlocal order
        heapq.heappush(events, (t, order, kind, payload))
        order += 1

    t, rid = 0.0, 0
    while True:
        t += work_rng.expovariate(rate)
        if t >= cfg.duration_s:
            break
        adapter = None if work_rng.random() < cfg.base_share else work_rng.choices(range(cfg.adapters), weights)[0]
        tokens = max(1, int(math.ceil(math.log(1.0 - work_rng.random()) / math.log(1.0 - 1.0 / cfg.mean_tokens))))
        push(t, "arrive", Request(rid, adapter, tokens, t))
        rid += 1

    pending: deque = deque()  # requests no replica accepted yet, FIFO
    done: list[Request] = []
    loads_after_warmup = 0

    def start_step(rep: Replica, now: float) -> None:
        nonlocal loads_after_warmup
        in_use = {q.adapter for q, _ in rep.running if q.adapter is not None}
        loads, waiting = 0, deque()
        while rep.queue and len(rep.running) < cfg.max_running:
            req = rep.queue.popleft()
            hit = True if req.adapter is None else rep.slot_for(req.adapter, in_use)
            if hit is None:  # every slot holds an adapter a running sequence needs
                waiting.append(req)
                continue
            if req.adapter is not None:
                in_use.add(req.adapter)
            if not hit:
                loads += 1
                rep.cold_loads += 1
                if now >= cfg.warmup_s:
                    loads_after_warmup += 1
            req.start, req.slot_hit = now, bool(hit)
            rep.running.append((req, req.tokens))
        waiting.extend(rep.queue)
        rep.queue = waiting
        if not rep.running:
            rep.busy = False
            return
        rep.busy = True
        dt = (cfg.step_ms + cfg.seq_ms * len(rep.running) + cfg.load_ms * loads) / 1000.0
        push(now + dt, "step", rep.index)

    def dispatch(now: float) -> None:
        while pending:
            rep = router.pick(pending[0])
            if rep is None:
                return
            req = pending.popleft()
            req.replica = rep.index
            rep.queue.append(req)
            if not rep.busy:
                start_step(rep, now)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            pending.append(payload)
            dispatch(now)
        else:
            rep = replicas[payload]
            still = []
            for req, left in rep.running:
                if left <= 1:
                    rep.served += 1
                    done.append(req)
                else:
                    still.append((req, left - 1))
            rep.running = still
            start_step(rep, now)
            dispatch(now)

    return summarize(cfg, router_kind, done, replicas, loads_after_warmup, rate)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(
    cfg: SimConfig, router_kind: str, done: list[Request], replicas: list[Replica], cold_loads: int, rate: float
) -> dict:
    counted = [r for r in done if r.arrival >= cfg.warmup_s and r.adapter is not None]
    delays_ms = [1000.0 * (r.start - r.arrival) for r in done if r.arrival >= cfg.warmup_s]
    per_replica = [0] * cfg.replicas
    for r in done:
        if r.arrival >= cfg.warmup_s:
            per_replica[r.replica] += 1
    mean = statistics.mean(per_replica) if per_replica else 0.0
    window = cfg.duration_s - cfg.warmup_s
    return {
        "router": router_kind,
        "arrival_rps": rate,
        "completed": len(delays_ms),
        "slot_hit_rate": sum(r.slot_hit for r in counted) / len(counted) if counted else float("nan"),
        "cold_loads_per_s": cold_loads / window,
        "load_imbalance": max(per_replica) / mean if mean else float("nan"),
        "queue_p50_ms": percentile(delays_ms, 0.50),
        "queue_p99_ms": percentile(delays_ms, 0.99),
    }


COLUMNS = (
    ("slot_hit_rate", "slot hit", "{:.3f}"),
    ("cold_loads_per_s", "cold loads/s", "{:.1f}"),
    ("load_imbalance", "imbalance max/mean", "{:.2f}"),
    ("queue_p50_ms", "queue p50 ms", "{:.0f}"),
    ("queue_p99_ms", "queue p99 ms", "{:.0f}"),
    ("completed", "completed", "{:d}"),
)


def table(cfg: SimConfig, rows: list[dict]) -> str:
    head = (
        f"route_sim: {cfg.adapters} adapters (Zipf s={cfg.zipf_s}), {cfg.replicas} replicas x {cfg.slots} slots, "
        f"{rows[0]['arrival_rps']:.0f} req/s = {cfg.load:.2f} x capacity {cfg.capacity_rps():.0f} req/s"
    )
    lines = [head, "", f"  {'router':<8}" + "".join(f"{label:>20}" for _, label, _ in COLUMNS)]
    for row in rows:
        lines.append(f"  {row['router']:<8}" + "".join(f"{fmt.format(row[key]):>20}" for key, _, fmt in COLUMNS))
    return "\n".join(lines)


def write_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label, _ in COLUMNS if k != "completed"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3))
    names = [r["router"] for r in rows]
    for ax, (key, label) in zip(axes, keys):
        # What ships (Ray's own routing) in blue, the best alternative in green, the rest grey.
        colors = [{"ray": "#4c72b0", "bounded": "#55a868"}.get(name, "#aaaaaa") for name in names]
        bars = ax.bar(names, [r[key] for r in rows], color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.margins(y=0.2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in SimConfig.__dataclass_fields__.values():
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = vars(parser.parse_args(argv))
    out, routers = args.pop("out"), args.pop("routers").split(",")
    cfg = SimConfig(**args)
    rows = [simulate(cfg, kind) for kind in routers]
    text = table(cfg, rows)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "route_sim.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=2) + "\n")
    write_chart(rows, out / "route_sim.png", text.split("\n")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`AdapterRouter`: which engine replica gets a request, as a Ray Serve request router.

Policy `bounded` (the default; `bench/route_sim.py` chose it: near capacity it halves p99 queueing
against Ray's own rule): a request for an adapter goes to the least-loaded replica that already
holds it, as long as that replica's load stays within `bound` x the mean load + 1 (consistent
hashing with bounded loads' rule, so a hot adapter spreads instead of queueing behind one
replica); otherwise to the less loaded of two random replicas, preferring one with a free model
slot (a cold load then evicts nothing). Base-only requests go to the least-loaded replica. Policy
`ray` is Serve's own power-of-two-choices with multiplex affinity, unchanged.

Both honour a request's `avoid` keyword (replicas it already lost; see `ReplicaEngineClient`).
`ranks` holds the policy as a pure function, testable without Ray; "holds" is what replicas
report through `@serve.multiplexed`, "load" Serve's cached queue lengths (missing = 0).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

POLICIES = ("bounded", "ray")


@dataclass(frozen=True)
class ReplicaView:
    """What the policy reads of a replica."""

    id: str
    load: int
    models: frozenset[str] = field(default_factory=frozenset)


def ranks(
    model_id: str, replicas: Sequence[ReplicaView], *, bound: float, max_models: int, rng: random.Random
) -> list[list[str]]:
    """Replica ids in preference ranks (Serve takes the least loaded accepting replica of the first
    rank that has one, then the next rank; none at all: it draws again after a backoff)."""
    if not replicas:
        return []
    if not model_id:
        return [[r.id for r in replicas]]
    limit = bound * sum(r.load for r in replicas) / len(replicas) + 1
    holders = [r.id for r in replicas if model_id in r.models and r.load <= limit]
    two = rng.sample(list(replicas), min(2, len(replicas)))
    free = [r.id for r in two if len(r.models) < max_models]
    rest = [r.id for r in two if len(r.models) >= max_models]
    return [rank for rank in (holders, free, rest) if rank]


class AdapterRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's request router for `EngineReplica` (see the module docstring).

    `request_router_kwargs`: `policy` ("bounded" | "ray"), `bound` (load bound factor),
    `max_models` (models a replica holds before Serve's LRU evicts, i.e. `MODELS_PER_REPLICA`).
    """

    def initialize_state(self, policy: str = "bounded", bound: float = 1.25, max_models: int = 8, **kwargs):
        if policy not in POLICIES:
            raise ValueError(f"router policy must be one of {POLICIES}, got {policy!r}")
        self.policy, self.bound, self.max_models = policy, bound, max_models
        self.rng = random.Random()

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        avoid = set((pending_request.kwargs.get("avoid") or ()) if pending_request is not None else ())
        if self.policy == "ray":
            chosen = await super().choose_replicas(candidate_replicas, pending_request)
        else:
            model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            views = [self._view(r) for r in candidate_replicas if r.replica_id.unique_id not in avoid]
            ordered = ranks(
                model_id or "", views or [self._view(r) for r in candidate_replicas],
                bound=self.bound, max_models=self.max_models, rng=self.rng,
            )  # fmt: skip
            chosen = [[by_id[i] for i in rank] for rank in ordered]
        if avoid:  # Serve's own rule knows nothing of them; keep them only when nothing else is left
            kept = [[r for r in rank if r.replica_id.unique_id not in avoid] for rank in chosen]
            chosen = [rank for rank in kept if rank] or chosen
        return chosen

    def _view(self, replica) -> ReplicaView:
        load = self.replica_queue_len_cache.get(replica.replica_id)
        return ReplicaView(replica.replica_id.unique_id, load or 0, frozenset(replica.multiplexed_model_ids))

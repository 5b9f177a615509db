"""The `bounded` routing policy as a pure function (no Ray cluster): the rule `bench/route_sim.py` chose.

Reference: route_sim's `Router._bounded` (holders within bound x mean load + 1, else two random
choices preferring a free model slot); Serve then takes the least-loaded accepting replica of the
first rank that has one.
"""

from __future__ import annotations

import random

import pytest

pytest.importorskip("ray")

from server.cluster.router import ReplicaView, ranks  # noqa: E402

RNG = random.Random(0)


def _ranks(model_id, replicas, max_models=2):
    return ranks(model_id, replicas, bound=1.25, max_models=max_models, rng=RNG)


def test_base_requests_may_go_to_any_replica_the_least_loaded_wins():
    replicas = [ReplicaView("a", 3), ReplicaView("b", 0), ReplicaView("c", 1)]
    assert _ranks("", replicas) == [["a", "b", "c"]]


def test_an_adapter_goes_to_its_holders_first():
    replicas = [ReplicaView("a", 1, frozenset({"x"})), ReplicaView("b", 1), ReplicaView("c", 2, frozenset({"x"}))]
    assert _ranks("x", replicas)[0] == ["a", "c"]


def test_a_holder_over_the_load_bound_is_skipped():
    # mean load 2, bound 1.25 x 2 + 1 = 3.5: the holder at 5 is over it, the one at 1 is not
    replicas = [ReplicaView("a", 5, frozenset({"x"})), ReplicaView("b", 0), ReplicaView("c", 1, frozenset({"x"}))]
    assert _ranks("x", replicas)[0] == ["c"]
    hot = [ReplicaView("a", 9, frozenset({"x"})), ReplicaView("b", 0), ReplicaView("c", 0)]
    assert "a" not in _ranks("x", hot)[0]  # spread instead of queueing behind the one holder


def test_a_cold_adapter_prefers_a_replica_with_a_free_model_slot():
    full = frozenset({"p", "q"})
    replicas = [ReplicaView("a", 0, full), ReplicaView("b", 0, frozenset({"p"}))]
    for _ in range(10):  # two random choices of two replicas: both, free slot first
        assert _ranks("x", replicas) == [["b"], ["a"]]


def test_no_replicas_no_ranks():
    assert _ranks("x", []) == []

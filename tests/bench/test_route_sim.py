"""The routing simulator's core on small cases: LRU slots, rendezvous ranks, routers, conservation."""

from __future__ import annotations

import json

import pytest

from bench import route_sim
from bench.route_sim import Replica, SimConfig, hrw_rank, simulate


def test_slots_evict_least_recently_used_but_never_one_in_use():
    rep = Replica(0, slots=2)
    assert rep.slot_for(1, set()) is False  # cold load
    assert rep.slot_for(2, set()) is False
    assert rep.slot_for(1, set()) is True  # hit; 2 is now least recently used
    assert rep.slot_for(3, set()) is False
    assert list(rep.resident) == [1, 3]
    assert rep.slot_for(4, in_use={1, 3}) is None  # both slots serve running sequences


def test_rendezvous_rank_is_stable_and_moves_only_the_removed_replica():
    ranks = {a: hrw_rank(a, 8) for a in range(50)}
    assert all(sorted(r) == list(range(8)) for r in ranks.values())
    assert ranks == {a: hrw_rank(a, 8) for a in range(50)}
    # Adapters are spread: the first choice is not always the same replica.
    assert len({r[0] for r in ranks.values()}) > 4


@pytest.mark.parametrize("router", route_sim.ROUTERS)
def test_every_request_completes_once(router):
    cfg = SimConfig(
        adapters=20, replicas=3, slots=2, max_running=4, max_ongoing=6, load=0.5, duration_s=20.0, warmup_s=2.0
    )
    row = simulate(cfg, router)
    again = simulate(cfg, router)
    assert row == again  # seeded: the same figures every run
    assert row["completed"] > 0.5 * cfg.load * cfg.capacity_rps() * (cfg.duration_s - cfg.warmup_s)
    assert 0.0 <= row["slot_hit_rate"] <= 1.0
    assert row["load_imbalance"] >= 1.0
    assert 0.0 <= row["queue_p50_ms"] <= row["queue_p99_ms"]


def test_affinity_beats_no_affinity_when_adapters_fit_the_slots():
    # 8 adapters, 4 replicas x 2 slots: an affinity router can keep every adapter hot somewhere;
    # random two-choice routing keeps reloading them.
    cfg = SimConfig(
        adapters=8,
        zipf_s=0.0,
        base_share=0.0,
        replicas=4,
        slots=2,
        max_running=4,
        max_ongoing=8,
        load=0.3,
        duration_s=60.0,
        warmup_s=10.0,
    )
    rows = {k: simulate(cfg, k) for k in route_sim.ROUTERS}
    for kind in ("ray", "hrw", "bounded"):
        assert rows[kind]["slot_hit_rate"] > rows["p2c"]["slot_hit_rate"] + 0.2, rows
        assert rows[kind]["cold_loads_per_s"] < rows["p2c"]["cold_loads_per_s"], rows


def test_one_replica_one_slot_hits_only_on_repeats():
    cfg = SimConfig(adapters=1, base_share=0.0, replicas=1, slots=1, load=0.2, duration_s=30.0, warmup_s=5.0)
    row = simulate(cfg, "ray")
    assert row["slot_hit_rate"] == 1.0 and row["cold_loads_per_s"] == 0.0 and row["load_imbalance"] == 1.0


def test_main_writes_table_json_and_png(tmp_path, capsys):
    code = route_sim.main(
        [
            "--adapters",
            "30",
            "--replicas",
            "3",
            "--slots",
            "2",
            "--duration-s",
            "10",
            "--warmup-s",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "route_sim.json").read_text())
    assert [r["router"] for r in data["rows"]] == list(route_sim.ROUTERS)
    assert (tmp_path / "route_sim.png").read_bytes()[:4] == b"\x89PNG"
    assert "slot hit" in capsys.readouterr().out


def test_config_names_the_bad_setting():
    with pytest.raises(ValueError, match="warmup_s"):
        SimConfig(duration_s=5, warmup_s=5)

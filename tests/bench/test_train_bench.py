"""The trainer benchmark's pieces that need no timing: its mixed-length data and its ratios."""

from __future__ import annotations

import json

import pytest

from bench.train_bench import PERSONA, _speedups, write_mixed


def test_mixed_data_joins_persona_exchanges_into_valid_multi_turn_conversations(tmp_path):
    rows = [json.loads(line) for line in write_mixed(tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == len(PERSONA.read_text().splitlines())
    turns = [len(r["messages"]) // 2 for r in rows]
    # 1..8 persona conversations each (a few of those are two exchanges long): a wide spread
    assert min(turns) == 1 and 8 <= max(turns) <= 16 and len(set(turns)) >= 8
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
    assert write_mixed(tmp_path / "again.jsonl").read_text() == (tmp_path / "m.jsonl").read_text()


def test_speedups_compare_ours_with_plain_per_dataset():
    def result(dataset, config, tps, tpc, peak):
        return {
            "dataset": dataset,
            "config": config,
            "tokens_per_second": tps,
            "tokens_per_cpu_second": tpc,
            "peak_rss_mb": peak + 100,
            "train_peak_rss_mb": peak,
        }

    rows = _speedups(
        [
            result("a", "plain", 100, 50, 1000),
            result("a", "ours", 160, 90, 800),
            result("a", "ours-qlora", 10, 5, 700),
            result("b", "ours", 1, 1, 1),
        ]
    )
    assert len(rows) == 1 and rows[0]["dataset"] == "a"
    assert rows[0]["speedup_wall"] == pytest.approx(1.6)
    assert rows[0]["speedup_cpu"] == pytest.approx(1.8)
    assert rows[0]["memory_ratio"] == pytest.approx(0.8)

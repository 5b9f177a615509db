"""The engine benchmark end to end on the tiny base: every figure present, and its greedy cross-checks agree.

This proves the harness, not the speed: on the tiny fp32 base our engine's tokens must equal
transformers + PEFT's row by row, the folded run must equal the unfolded one, and the 64-adapter
run must equal the mixed run where request and adapter coincide. Timings are not asserted.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import engine_bench


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_engine_bench_on_tiny_base(tiny_base_dir, tmp_path, monkeypatch, restore_threads, capsys):
    monkeypatch.setenv("LORASWAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    code = engine_bench.main(
        [
            "--base",
            str(tiny_base_dir),
            "--new-tokens",
            "4",
            "--many-adapters",
            "10",
            "--load-repeats",
            "2",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "engine_none.json").read_text())
    measures = {m["key"]: m for m in data["measures"]}
    required = {"a", "b", "b_slots", "c", "c0", "d", "e", "e_peft", "f", "f_rot_on", "f_rot_off", "g", "g_cold"}
    assert required <= set(measures) <= required | {"a_dec"}  # a_dec is derived, absent if noise ate it
    assert all(m["value"] > 0 for m in measures.values())
    assert measures["f"]["note"] == "folded"
    assert "2 disk reads" in measures["g_cold"]["note"]  # 10 adapters, 8 already read by (a)
    checks = {c["check"].split(" ")[0]: c for c in data["checks"]}
    assert set(checks) == {"(a)", "(f)", "(g)"}
    for check in checks.values():
        assert check["agree"] == check["total"] > 0, check
    assert [t["verdict"] in ("met", "not met") for t in data["targets"]] == [True] * 7
    assert not any(note.startswith("WARNING") for note in data["notes"])
    assert (out / "engine_none.png").read_bytes()[:4] == b"\x89PNG"
    assert "targets:" in capsys.readouterr().out


def test_run_all_plans_both_quantizations():
    from bench.run_all import plan

    commands = plan(["--threads", "2"])
    flags = [" ".join(c[3:]) for c in commands[:2]]
    assert flags == ["--quant none --dtype float32 --threads 2", "--quant nf4 --threads 2"]
    bf16 = [" ".join(c[3:]) for c in commands if c[2] == "bench.engine_bench" and "bfloat16" in c]
    assert bf16 == [
        "--quant none --dtype bfloat16 --skip-hf --threads 2",
        "--quant nf4 --dtype bfloat16 --skip-hf --threads 2",
    ]

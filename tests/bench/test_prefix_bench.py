"""The prefix-cache benchmark end to end on the tiny base: every figure present and positive, the
targets evaluated. Timings are not asserted."""

from __future__ import annotations

import json

import torch

from bench import prefix_bench


def test_prefix_bench_on_tiny_base(tiny_base_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        prefix_bench.main(
            [
                "--base",
                str(tiny_base_dir),
                "--conversations",
                "3",
                "--turns",
                "2",
                "--adapters",
                "2",
                "--new-tokens",
                "3",
                "--groups",
                "2",
                "--n-tokens",
                "3",
                "--repeats",
                "1",
                "--system-words",
                "30",
                "--threads",
                "1",
                "--out",
                str(tmp_path),
                "--skip-hf",
            ]
        )  # foreign flags pass
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "prefix_none.json").read_text())
    measures = {m["key"]: m["value"] for m in data["measures"]}
    for key in ("on", "off", "n4", "sep4"):
        for suffix in ("tps", "cpu_tps", "ttft", "ttft_inv"):
            assert measures[f"{key}_{suffix}"] > 0
    assert [t["verdict"] in ("met", "not met") for t in data["targets"]] == [True, True, True]
    assert "targets:" in capsys.readouterr().out

"""The structured-outputs benchmark end to end on the tiny base: every figure present, both batches
generated the same number of tokens (the harness asserts it), the target evaluated. Timings are not asserted."""

from __future__ import annotations

import json

import torch

from bench import structured_bench


def test_structured_bench_on_tiny_base(tiny_base_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        structured_bench.main(
            [
                "--base",
                str(tiny_base_dir),
                "--requests",
                "4",
                "--new-tokens",
                "6",
                "--threads",
                "1",
                "--repeats",
                "2",
                "--out",
                str(tmp_path),
                "--skip-hf",
            ]
        )  # foreign flags pass
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "structured_none.json").read_text())
    measures = {m["key"]: m["value"] for m in data["measures"]}
    assert set(measures) == {
        "tok",
        "compile_person",
        "compile_invoice",
        "compile_tool_call",
        "mask_step",
        "free_cpu",
        "free_wall",
        "mixed_cpu",
        "mixed_wall",
    }
    assert all(value > 0 for value in measures.values())
    assert [t["verdict"] in ("met", "not met") for t in data["targets"]] == [True]
    assert "targets:" in capsys.readouterr().out

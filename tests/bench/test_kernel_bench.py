"""bench.kernel_bench: the native kernels against the eager ops, a step's worth (issue 15)."""

from __future__ import annotations

import json

import pytest

import torch

from server.engine import fused, packed
from server.engine.fold import NF4_FOLD_MIN_ROWS


def test_kernel_bench_on_tiny_base_writes_every_row(tiny_base_dir, tmp_path, capsys):
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    from bench import kernel_bench

    code = kernel_bench.main(
        ["--base", str(tiny_base_dir), "--batch", "4", "--keys", "20", "--adapters", "2", "--rank", "4"]
        + ["--rounds", "1", "--out", str(tmp_path)]
    )
    assert code == 0
    nf4_kinds = ("", "_bnb") + (("_fold",) if packed.supported(torch.device("cpu"), torch.bfloat16) else ())
    nf4_kinds += ("_amx",) if fused.amx_available() else ()
    measures = {m["key"]: m["value"] for m in json.loads((tmp_path / "kernels.json").read_text())["measures"]}
    assert set(measures) == {
        "attention_bf16",
        "attention_bf16_eager",
        "attention_fp32",
        "attention_fp32_eager",
        "lora_fp32_slots",
        "lora_bf16_slots",
        "lora_fp32_slots_eager",
    } | {f"nf4_{rows}{kind}" for rows in (4, NF4_FOLD_MIN_ROWS, 1) for kind in nf4_kinds}
    assert all(value > 0 for value in measures.values())
    assert fused.enabled()  # the benchmark leaves the kernels on


def test_make_bench_runs_the_kernel_bench():
    from bench.run_all import plan

    assert any(command[2] == "bench.kernel_bench" for command in plan([]))

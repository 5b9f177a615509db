"""bench.fma_peak compiles its loop, measures 1 and all threads, and writes its report."""

from __future__ import annotations

import json
import shutil

import pytest

from bench import fma_peak


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_fma_peak_writes_a_positive_peak_per_thread_count(tmp_path):
    assert fma_peak.main(["--iters", "200000", "--repeats", "1", "--out", str(tmp_path)]) == 0
    measures = {m["key"]: m["value"] for m in json.loads((tmp_path / "fma_peak.json").read_text())["measures"]}
    assert "fma@1" in measures
    assert all(value > 0 for value in measures.values())

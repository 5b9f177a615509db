"""The HTTP sweep end to end on the tiny base (`--quick`): a real `loraswap serve` child, uploads
through the API, every wave and ceiling measured, the JSON and PNG written. Proves the harness, not
the speed: no timing is asserted, but every request must have made exactly the asked-for tokens."""

from __future__ import annotations

import json

from bench import http_sweep


def test_http_sweep_quick_on_tiny_base(tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LORASWAP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    code = http_sweep.main(["--base", str(tiny_base_dir), "--quant", "none", "--quick", "--out", str(out)])
    assert code == 0
    data = json.loads((out / "http_none.json").read_text())
    measures = {m["key"]: m for m in data["measures"]}
    expected = {"d@16", "hf@1", "base@4/plain", "churn_cold@16", "churn@16", "mixed@8/slots"}
    expected |= {f"{kind}@{c}" for kind in ("base", "mixed") for c in (1, 4)}
    assert set(measures) == expected
    assert all(m["value"] > 0 for m in measures.values())
    assert "best of 2 passes" in measures["base@4"]["note"]  # passes interleaved, the fastest kept
    assert "1 pass" in measures["churn_cold@16"]["note"]  # a second pass would no longer be cold
    assert "tokens/step" in measures["base@4"]["note"]  # the engine's step counters reached /metrics
    assert not [note for note in data["notes"] if note.startswith("WARNING")]  # every request made 4 tokens
    assert {t["name"] for t in data["targets"]} == {t.name for t in http_sweep.TARGETS}
    assert (out / "http_none.png").read_bytes()[:4] == b"\x89PNG"


def test_make_bench_runs_the_sweep_in_every_dtype():
    from bench.run_all import plan

    sweeps = [" ".join(c[3:]) for c in plan(["--threads", "2"]) if c[2] == "bench.http_sweep"]
    assert sweeps == [
        "--quant none --dtype float32",
        "--quant nf4",
        "--quant none --dtype bfloat16",
        "--quant nf4 --dtype bfloat16",
        "--quant none --dtype bfloat16 --lora-dtype bfloat16",
    ]

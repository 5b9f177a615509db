"""`loraswap merge` from the command line: reads PEFT directories, writes one, prints the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.format import PROVENANCE_FILE, read_peft, write_peft
from loraswap.cli import main as loraswap
from tests.adapters.test_merge_adapters import attn, mlp, random_adapter
from trainer.merge_cli import parse_adapter_spec


@pytest.fixture
def adapter_dirs(tmp_path):
    first = random_adapter(1, 4, 8, [attn(0, "q_proj"), attn(1, "v_proj")])
    second = random_adapter(2, 8, 16, [attn(0, "q_proj"), mlp(1, "down_proj")], use_rslora=True)
    identity = {"base_fingerprint": "f" * 64, "chat_template_sha256": "c" * 64}
    return (
        write_peft(first, tmp_path / "greeting", identity),
        write_peft(second, tmp_path / "signoff", identity),
    )


def test_cat_from_the_cli_writes_the_exact_weighted_sum(adapter_dirs, tmp_path, capsys):
    a, b = adapter_dirs
    out = tmp_path / "merged"
    assert (
        loraswap(["merge", "--method", "cat", "--adapter", f"{a}:0.5", "--adapter", f"{b}:2", "--out", str(out)]) == 0
    )
    merged, first, second = read_peft(out), read_peft(a), read_peft(b)
    expected = 0.5 * first.modules[attn(0, "q_proj")].delta() + 2 * second.modules[attn(0, "q_proj")].delta()
    torch.testing.assert_close(merged.modules[attn(0, "q_proj")].delta(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        merged.modules[mlp(1, "down_proj")].delta(), 2 * second.modules[mlp(1, "down_proj")].delta(), rtol=0, atol=1e-6
    )
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert provenance["base_fingerprint"] == "f" * 64
    assert [i["weight"] for i in provenance["merge"]["inputs"]] == [0.5, 2.0]
    assert "exact (cat)" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_ties_prints_the_svd_error_summary(adapter_dirs, tmp_path, capsys):
    a, b = adapter_dirs
    out = tmp_path / "ties"
    code = loraswap(
        ["merge", "--method", "ties", "--adapter", str(a), "--adapter", str(b), "--out", str(out), "--rank", "2"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    stored = json.loads((out / PROVENANCE_FILE).read_text())["merge"]
    assert stored["rank"] == 2 and stored["density"] == 0.5 and stored["seed"] == 0
    worst = max(stored["svd_errors"].items(), key=lambda kv: kv[1])
    assert "SVD relative Frobenius error" in printed and "q_proj" in printed
    assert f"{worst[0]:<40} {worst[1]:.3e}" in printed
    assert all(m.rank == 2 for m in read_peft(out).modules.values())


def test_incompatible_inputs_are_refused_and_nothing_is_written(adapter_dirs, tmp_path, capsys):
    a, b = adapter_dirs
    (b / PROVENANCE_FILE).write_text(json.dumps({"base_fingerprint": "e" * 64, "chat_template_sha256": "c" * 64}))
    out = tmp_path / "refused"
    assert loraswap(["merge", "--method", "linear", "--adapter", str(a), "--adapter", str(b), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "base model fingerprint" in err and "greeting=ffff" in err and "signoff=eeee" in err
    assert not out.exists()


def test_existing_output_and_missing_input_are_refused(adapter_dirs, tmp_path, capsys):
    a, _ = adapter_dirs
    assert loraswap(["merge", "--method", "cat", "--adapter", str(a), "--out", str(a)]) == 1
    assert "already exists" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert loraswap(["merge", "--method", "cat", "--adapter", str(missing), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_adapter_spec_parsing():
    assert parse_adapter_spec("runs/a:0.25") == (Path("runs/a"), 0.25)
    assert parse_adapter_spec("runs/a:-1") == (Path("runs/a"), -1.0)
    assert parse_adapter_spec("runs/a") == (Path("runs/a"), 1.0)
    assert parse_adapter_spec("runs/v1:final") == (Path("runs/v1:final"), 1.0)


def test_invalid_provenance_is_reported(adapter_dirs, tmp_path, capsys):
    a, b = adapter_dirs
    (b / PROVENANCE_FILE).write_text('{"base_fingerprint": "not-a-digest"}')
    assert (
        loraswap(["merge", "--method", "cat", "--adapter", str(a), "--adapter", str(b), "--out", str(tmp_path / "o")])
        == 1
    )
    assert "base_fingerprint" in capsys.readouterr().err

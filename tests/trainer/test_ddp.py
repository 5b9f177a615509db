"""Data-parallel training: a 2-process torchrun run (gloo, CPU) trains the same adapter as one process.

The reference is the 1-process run on the same flags: `--batch-size` and `--grad-accum` are global,
so both take the same optimizer steps over the same examples; only the float summation order of
the gradients differs (each rank packs half of each micro-batch, then DDP all-reduces). Tolerance:
every LoRA tensor within atol 2e-4 + rtol 1e-3 of the 1-process one after 4 AdamW steps at lr 1e-2,
while the adapters moved by more than 1e-2 from their start (so equality is not trivial);
measured: 3.6e-5 at most, with |B| up to 0.03 (LoRA, gloo, 2 CPU processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters.format import read_peft
from tests.trainer.test_training import ROWS
from trainer.distributed import DistContext, shard
from trainer.lora import LoraSpec
from trainer.sft import TrainConfig, run

REPO = Path(__file__).resolve().parents[2]
# 6 rows, batch 5, accumulation 2: each step is micro-batches of 5 and 1 examples, so one rank's
# share of the second is empty (it must still join DDP's all-reduce) and no_sync is exercised.
FLAGS = dict(epochs=4, lr=1e-2, batch_size=5, grad_accum=2, max_length=128, seed=0)


def _write_data(tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return data


def _torchrun(tmp_path: Path, base: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [
        "--data",
        str(_write_data(tmp_path)),
        "--out",
        str(out),
        "--base",
        str(base),
        "--no-progress",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--dropout",
        "0",
        "--device",
        "cpu",
        "--nproc",
        "2",
        *[x for k, v in FLAGS.items() for x in (f"--{k.replace('_', '-')}", str(v))],
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _one_process(tmp_path: Path, base: Path, **overrides):
    config = TrainConfig(
        data=_write_data(tmp_path),
        out=tmp_path / "one",
        base=str(base),
        progress=False,
        device="cpu",
        lora=LoraSpec(rank=4, alpha=8, dropout=0.0),
        **{**FLAGS, **overrides},
    )
    return run(config, log=lambda *_: None)


def _assert_same_adapter(one: Path, two: Path) -> None:
    a, b = read_peft(one), read_peft(two)
    assert a.modules.keys() == b.modules.keys()
    moved = 0.0
    for name, ma in a.modules.items():
        mb = b.modules[name]
        torch.testing.assert_close(mb.A, ma.A, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(mb.B, ma.B, atol=2e-4, rtol=1e-3)
        moved = max(moved, float(ma.B.abs().max()))  # B starts at zero
    assert moved > 1e-2


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_two_processes_train_the_same_adapter_as_one(tmp_path, tiny_base_dir, qlora):
    extra = ("--qlora",) if qlora else ()
    _, single = _one_process(tmp_path, tiny_base_dir, qlora=qlora)
    two = tmp_path / "two"
    proc = _torchrun(tmp_path, tiny_base_dir, two, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_adapter(single.out, two)

    provenance = json.loads((two / "loraswap.json").read_text())
    assert provenance["hyperparameters"]["world_size"] == 2
    assert provenance["hyperparameters"]["batch_size"] == FLAGS["batch_size"]
    assert provenance["hyperparameters"]["qlora"] is qlora
    # Losses and token counts are global: the same as the single process saw.
    assert provenance["metrics"]["tokens_seen"] == single.tokens_seen
    assert provenance["metrics"]["train_loss"] == pytest.approx(single.train_loss, rel=1e-4)
    assert proc.stdout.count("adapter written to") == 1  # rank 0 alone writes and logs
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in single.out.iterdir())


def test_shards_cover_a_micro_batch_once():
    items = list(range(7))
    shares = [shard(items, r, 3) for r in range(3)]
    assert sorted(x for s in shares for x in s) == items
    assert [len(s) for s in shares] == [3, 2, 2]
    assert shard([1], 1, 2) == []  # the empty share the recipe trains at weight 0


def test_single_process_context_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistContext.from_env("cpu")
    assert not ctx.distributed and ctx.is_main and ctx.world_size == 1
    assert ctx.all_reduce_sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    with pytest.raises(ValueError, match="rank"):
        DistContext(rank=2, world_size=2)


def test_nproc_is_stripped_before_torchrun():
    from trainer.cli import _without_nproc

    assert _without_nproc(["--data", "x", "--nproc", "2", "--qlora", "--nproc=3"]) == ["--data", "x", "--qlora"]

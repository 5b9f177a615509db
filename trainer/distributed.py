"""Data-parallel training over torch.distributed: who am I, which examples are mine, and the launcher.

`DistContext.from_env()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and joins
the process group (gloo on CPU, nccl on CUDA); without it the context is a single process and
nothing here touches torch.distributed. `shard` splits one global micro-batch between ranks so
every rank runs the same number of micro-batches per optimizer step (DDP's all-reduce needs that);
`launch` re-runs the trainer under `torch.distributed.run` for `loraswap train --nproc N`.
This module knows nothing about models or losses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: `rank` of `world_size`, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: not distributed

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}")

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Only the main rank logs, writes files and publishes."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        """Join the process group torchrun described, or a single-process context when there is none."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=backend)
        return cls(rank=rank, world_size=world, local_rank=local_rank, backend=backend)

    def device(self, name: str) -> torch.device:
        """The device for `--device name`: under DDP on CUDA, the local rank's GPU."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if self.distributed and name == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def all_reduce_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, so logged sums are exact enough)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's share of one global micro-batch: every `world_size`-th item from `rank`.

    Shares differ by at most one item; a rank whose share is empty must still take part in the
    step (see `SFTRecipe.step`), because DDP all-reduces once per backward on every rank.
    """
    return list(items[rank::world_size])


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m trainer.cli ARGV` in `nproc` processes under torch.distributed.run (torchrun).

    Args:
        argv: the trainer's flags without `--nproc`.
        nproc: processes on this machine (one per GPU on CUDA; any number on CPU).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "trainer.cli",
        *argv,
    ]
    env = dict(os.environ)
    # Each CPU process would otherwise start one thread per core and the N of them oversubscribe.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(command, env=env).returncode

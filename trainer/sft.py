"""The SFT recipe: setup / train / save, in the shape of torchtune's single-device LoRA recipe.

`setup` resolves the base, renders the data through the served chat template, loads the model
(LoRA or QLoRA) and builds AdamW with linear warmup and decay. `train` runs the epochs over
packed micro-batches with gradient accumulation and clipping, shows loss, tokens/s and ETA in
a tqdm bar, and computes the eval loss after every epoch when eval data is given. `save`
writes the PEFT directory, `loraswap.json` provenance and a loss-curve PNG.

Under torchrun (a `DistContext` with world_size N) the same recipe runs data-parallel: every rank
builds the same global micro-batches, trains on its share of each (`distributed.shard`) through
DDP, and only rank 0 logs and writes. `batch_size` and `grad_accum` stay global, so an N-process
run takes the same optimizer steps as a 1-process run on the same flags.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters.base import BaseInfo, resolve_base
from adapters.chat_template import ChatTemplate
from adapters.format import write_peft
from trainer.batching import PackedBatch, micro_batch_groups, micro_batches, pack, token_cost_for
from trainer.data import Dataset, Example, load_jsonl
from trainer.distributed import DistContext, shard
from trainer.lora import LoraSpec, export_lora
from trainer.loss import token_losses
from trainer.model import TrainableModel, load_trainable, parse_dtype
from trainer.report import build_provenance, plot_loss_curve


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs; the CLI flags map onto these one to one."""

    data: Path
    out: Path
    base: str = "default"
    qlora: bool = False
    lora: LoraSpec = field(default_factory=LoraSpec)
    epochs: int = 3
    lr: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    eval_data: Path | None = None
    seed: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        parse_dtype(self.dtype)

    def hyperparameters(self) -> dict:
        keep = (
            "qlora",
            "epochs",
            "lr",
            "batch_size",
            "grad_accum",
            "max_length",
            "seed",
            "warmup_ratio",
            "weight_decay",
            "max_grad_norm",
            "dtype",
        )
        params = {k: getattr(self, k) for k in keep}
        params.update(asdict(self.lora))
        params["target_modules"] = list(self.lora.target_modules)
        return params


@dataclass
class TrainResult:
    """What a run produced: losses per step and per epoch, tokens seen, where it was saved."""

    step_losses: list[float] = field(default_factory=list)
    epoch_train_losses: list[float] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    targets_seen: int = 0
    seconds: float = 0.0
    out: Path | None = None

    @property
    def train_loss(self) -> float | None:
        return self.epoch_train_losses[-1] if self.epoch_train_losses else None

    @property
    def eval_loss(self) -> float | None:
        return self.eval_losses[-1] if self.eval_losses else None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds else 0.0


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class SFTRecipe:
    """One training run. Call `setup()`, `train()`, then `save(result)` (or just `run`)."""

    def __init__(self, config: TrainConfig, log=print, dist: DistContext | None = None):
        self.config = config
        self.dist = dist or DistContext()
        self.log = log if self.dist.is_main else (lambda *args, **kwargs: None)

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.config
        from transformers import AutoTokenizer

        torch.manual_seed(cfg.seed)
        self.device = self.dist.device(cfg.device) if self.dist.distributed else _pick_device(cfg.device)
        self.base_dir = resolve_base(cfg.base)
        self.info = BaseInfo.from_dir(self.base_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
        self.template = ChatTemplate(self.tokenizer)
        self.train_data = load_jsonl(cfg.data, self.template, cfg.max_length)
        self.log(self.train_data.summary("train"))
        self.eval_data: Dataset | None = None
        if cfg.eval_data is not None:
            self.eval_data = load_jsonl(cfg.eval_data, self.template, cfg.max_length)
            self.log(self.eval_data.summary("eval"))
        self.trainable: TrainableModel = load_trainable(
            self.base_dir, cfg.lora, qlora=cfg.qlora, dtype=parse_dtype(cfg.dtype), info=self.info, device=self.device
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.token_cost = token_cost_for(self.info.linear_shapes)
        self.loss_module = self._data_parallel(_LossModule(self.trainable.model))
        params = self.trainable.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        micro = math.ceil(len(self.train_data.examples) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(micro / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup = max(1, round(cfg.warmup_ratio * self.total_steps)) if cfg.warmup_ratio > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_then_linear(warmup, self.total_steps)
        )
        n_params = sum(p.numel() for p in params)
        self.log(
            f"{'QLoRA (NF4 base)' if cfg.qlora else 'LoRA'}: {n_params:,} trainable parameters in "
            f"{len(self.trainable.wrappers)} modules; {self.total_steps} optimizer steps on {self.device}"
            + (f" x {self.dist.world_size} processes ({self.dist.backend})" if self.dist.distributed else "")
        )

    def _data_parallel(self, module: nn.Module) -> nn.Module:
        """DDP over the LoRA parameters only: the frozen base is identical on every rank by construction."""
        if not self.dist.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
        # Skipping the frozen base keeps DDP from broadcasting it (NF4 weights included) at start-up.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    # ---------------------------------------------------------------- train

    def batches(self, data: Dataset, shuffle: bool, seed: int = 0) -> list[PackedBatch]:
        return micro_batches(
            data.examples,
            self.config.batch_size,
            token_cost=self.token_cost,
            pad_id=self.pad_id,
            shuffle=shuffle,
            seed=seed,
        )

    # Hooks for the job service (trainer/job_recipe.py): events, cancel, checkpoints, resume.
    start_epoch = 0

    def on_step(self, epoch: int, result: "TrainResult") -> None:
        """Called after every optimizer step (`result.step_losses[-1]` is its loss)."""

    def on_epoch_end(self, epoch: int, result: "TrainResult") -> None:
        """Called after every epoch, once its eval loss (if any) is in `result`."""

    def train(self, result: TrainResult | None = None) -> TrainResult:
        """Run epochs `start_epoch..epochs-1`, continuing `result` when resuming."""
        from tqdm.auto import tqdm

        cfg, model = self.config, self.trainable.model
        params = self.trainable.trainable_parameters()
        result = result if result is not None else TrainResult()
        bar = tqdm(
            total=self.total_steps,
            initial=len(result.step_losses),
            desc="train",
            unit="step",
            disable=not (cfg.progress and self.dist.is_main),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        start = time.perf_counter() - result.seconds
        for epoch in range(self.start_epoch, cfg.epochs):
            model.train()
            groups = micro_batch_groups(self.train_data.examples, cfg.batch_size, shuffle=True, seed=cfg.seed + epoch)
            epoch_loss = epoch_targets = 0.0
            for first in range(0, len(groups), cfg.grad_accum):
                loss_sum, targets, tokens = self.global_step(params, groups[first : first + cfg.grad_accum])
                result.step_losses.append(loss_sum / targets)
                result.tokens_seen += tokens
                result.targets_seen += targets
                epoch_loss, epoch_targets = epoch_loss + loss_sum, epoch_targets + targets
                rate = result.tokens_seen / (time.perf_counter() - start)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / targets:.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                self.on_step(epoch, result)
            result.epoch_train_losses.append(epoch_loss / epoch_targets)
            if self.eval_data is not None:
                result.eval_losses.append(self.evaluate(self.eval_data))
                bar.write(
                    f"epoch {epoch + 1}: train loss {result.epoch_train_losses[-1]:.4f}, "
                    f"eval loss {result.eval_losses[-1]:.4f}"
                )
            result.seconds = time.perf_counter() - start
            self.on_epoch_end(epoch, result)
        bar.close()
        result.seconds = time.perf_counter() - start
        self.log(
            f"done: {result.tokens_seen} tokens in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tok/s), "
            f"final train loss {result.train_loss:.4f}"
            + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
        )
        return result

    def step(self, model, params, step: list[PackedBatch]) -> tuple[float, int]:
        """One single-process optimizer step over packed micro-batches (the benchmark's entry point)."""
        targets = sum(b.num_targets for b in step)
        loss_sum = 0.0
        for batch in step:
            losses = token_losses(model, batch.to(self.device))
            (losses.sum() / targets).backward()
            loss_sum += float(losses.detach().sum())
        self._optimizer_step(params)
        return loss_sum, targets

    def global_step(self, params, groups: list[list[Example]]) -> tuple[float, int, int]:
        """One optimizer step over the global micro-batches `groups`: (loss sum, targets, tokens), all ranks.

        The loss is the mean over every target of every group on every rank. DDP averages gradients
        over ranks, so each rank scales its share by world_size; a rank whose share of a group is
        empty runs one example at weight 0, because every rank must join every all-reduce.
        """
        world, rank = self.dist.world_size, self.dist.rank
        targets = sum(e.num_targets for group in groups for e in group)
        loss_sum = tokens = 0.0
        for i, group in enumerate(groups):
            mine = shard(group, rank, world)
            weight = float(world) if mine else 0.0
            batch = pack(mine or group[:1], self.token_cost, self.pad_id).to(self.device)
            last = i == len(groups) - 1
            with contextlib.nullcontext() if last or not self.dist.distributed else self.loss_module.no_sync():
                losses = self.loss_module(batch)
                (losses.sum() * (weight / targets)).backward()
            if mine:
                loss_sum, tokens = loss_sum + float(losses.detach().sum()), tokens + batch.num_tokens
        loss_sum, tokens = self.dist.all_reduce_sum([loss_sum, tokens], self.device)
        self._optimizer_step(params)
        return loss_sum, targets, int(tokens)

    def _optimizer_step(self, params) -> None:
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> float:
        """Token-weighted mean loss over `data` (dropout off); ranks split the micro-batches."""
        model = self.trainable.model
        model.eval()
        total = count = 0.0
        for batch in shard(self.batches(data, shuffle=False), self.dist.rank, self.dist.world_size):
            losses = token_losses(model, batch.to(self.device))
            total, count = total + float(losses.sum()), count + losses.numel()
        model.train()
        total, count = self.dist.all_reduce_sum([total, count], self.device)
        return total / count

    # ---------------------------------------------------------------- save

    def save(self, result: TrainResult) -> Path:
        """Write the PEFT adapter, `loraswap.json` and `loss_curve.png` into `config.out` (rank 0 only)."""
        cfg = self.config
        if not self.dist.is_main:
            return cfg.out
        weights = export_lora(self.trainable.wrappers, cfg.lora, base_name=str(self.base_dir))
        provenance = build_provenance(self, result)
        out = write_peft(weights, cfg.out, provenance=provenance)
        plot_loss_curve(result, out / "loss_curve.png", self.steps_per_epoch)
        result.out = out
        self.log(f"adapter written to {out}")
        return out


class _LossModule(nn.Module):
    """`token_losses` as a module's forward, so DDP sees (and hooks) the pass that makes the gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        return token_losses(self.model, batch)


def _warmup_then_linear(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def run(config: TrainConfig, log=print, dist: DistContext | None = None) -> tuple[SFTRecipe, TrainResult]:
    """Set up, train and save; returns the recipe (holding the trained model) and the result.

    Args:
        dist: this process's rank under torchrun (`DistContext.from_env()`); None for one process.
    """
    recipe = SFTRecipe(config, log=log, dist=dist)
    recipe.setup()
    result = recipe.train()
    recipe.save(result)
    return recipe, result

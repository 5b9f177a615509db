"""The SFT recipe: setup / train / save, in the shape of torchtune's single-device LoRA recipe.

`setup` resolves the base, renders the data through the served chat template, loads the model
(LoRA or QLoRA) and builds AdamW with linear warmup and decay. `train` runs the epochs over
packed micro-batches with gradient accumulation and clipping, shows loss, tokens/s and ETA in
a tqdm bar, and computes the eval loss after every epoch when eval data is given. `save`
writes the PEFT directory, `loraswap.json` provenance and a loss-curve PNG.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adapters.base import BaseInfo, resolve_base
from adapters.chat_template import ChatTemplate
from adapters.format import write_peft
from trainer.batching import PackedBatch, micro_batches, token_cost_for
from trainer.data import Dataset, load_jsonl
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
        keep = ("qlora", "epochs", "lr", "batch_size", "grad_accum", "max_length", "seed",
                "warmup_ratio", "weight_decay", "max_grad_norm", "dtype")
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

    def __init__(self, config: TrainConfig, log=print):
        self.config = config
        self.log = log

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.config
        from transformers import AutoTokenizer

        torch.manual_seed(cfg.seed)
        self.device = _pick_device(cfg.device)
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
        params = self.trainable.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        micro = math.ceil(len(self.train_data.examples) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(micro / cfg.grad_accum)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        warmup = max(1, round(cfg.warmup_ratio * self.total_steps)) if cfg.warmup_ratio > 0 else 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _warmup_then_linear(warmup, self.total_steps))
        n_params = sum(p.numel() for p in params)
        self.log(f"{'QLoRA (NF4 base)' if cfg.qlora else 'LoRA'}: {n_params:,} trainable parameters in "
                 f"{len(self.trainable.wrappers)} modules; {self.total_steps} optimizer steps on {self.device}")

    # ---------------------------------------------------------------- train

    def batches(self, data: Dataset, shuffle: bool, seed: int = 0) -> list[PackedBatch]:
        return micro_batches(
            data.examples, self.config.batch_size, token_cost=self.token_cost, pad_id=self.pad_id,
            shuffle=shuffle, seed=seed,
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
        bar = tqdm(total=self.total_steps, initial=len(result.step_losses), desc="train", unit="step",
                   disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0)
        start = time.perf_counter() - result.seconds
        for epoch in range(self.start_epoch, cfg.epochs):
            model.train()
            batches = self.batches(self.train_data, shuffle=True, seed=cfg.seed + epoch)
            epoch_loss = epoch_targets = 0.0
            for first in range(0, len(batches), cfg.grad_accum):
                step = batches[first : first + cfg.grad_accum]
                loss_sum, targets = self.step(model, params, step)
                result.step_losses.append(loss_sum / targets)
                result.tokens_seen += sum(b.num_tokens for b in step)
                result.targets_seen += targets
                epoch_loss, epoch_targets = epoch_loss + loss_sum, epoch_targets + targets
                rate = result.tokens_seen / (time.perf_counter() - start)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / targets:.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                self.on_step(epoch, result)
            result.epoch_train_losses.append(epoch_loss / epoch_targets)
            if self.eval_data is not None:
                result.eval_losses.append(self.evaluate(self.eval_data))
                bar.write(f"epoch {epoch + 1}: train loss {result.epoch_train_losses[-1]:.4f}, "
                          f"eval loss {result.eval_losses[-1]:.4f}")
            result.seconds = time.perf_counter() - start
            self.on_epoch_end(epoch, result)
        bar.close()
        result.seconds = time.perf_counter() - start
        self.log(f"done: {result.tokens_seen} tokens in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tok/s), "
                 f"final train loss {result.train_loss:.4f}"
                 + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""))
        return result

    def step(self, model, params, step: list[PackedBatch]) -> tuple[float, int]:
        """One optimizer step over `step`'s micro-batches; the loss is the mean over all their targets."""
        targets = sum(b.num_targets for b in step)
        loss_sum = 0.0
        for batch in step:
            losses = token_losses(model, batch.to(self.device))
            (losses.sum() / targets).backward()
            loss_sum += float(losses.detach().sum())
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, targets

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> float:
        """Token-weighted mean loss over `data` (dropout off)."""
        model = self.trainable.model
        model.eval()
        total = count = 0.0
        for batch in self.batches(data, shuffle=False):
            losses = token_losses(model, batch.to(self.device))
            total, count = total + float(losses.sum()), count + losses.numel()
        model.train()
        return total / count

    # ---------------------------------------------------------------- save

    def save(self, result: TrainResult) -> Path:
        """Write the PEFT adapter, `loraswap.json` and `loss_curve.png` into `config.out`."""
        cfg = self.config
        weights = export_lora(self.trainable.wrappers, cfg.lora, base_name=str(self.base_dir))
        provenance = build_provenance(self, result)
        out = write_peft(weights, cfg.out, provenance=provenance)
        plot_loss_curve(result, out / "loss_curve.png", self.steps_per_epoch)
        result.out = out
        self.log(f"adapter written to {out}")
        return out


def _warmup_then_linear(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def run(config: TrainConfig, log=print) -> tuple[SFTRecipe, TrainResult]:
    """Set up, train and save; returns the recipe (holding the trained model) and the result."""
    recipe = SFTRecipe(config, log=log)
    recipe.setup()
    result = recipe.train()
    recipe.save(result)
    return recipe, result

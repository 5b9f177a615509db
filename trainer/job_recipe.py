"""The SFT recipe run as a fine-tuning job: events per step, a checkpoint per epoch, cancel, resume.

`JobRecipe` is `SFTRecipe` with its hooks filled in. After every optimizer step it records the
loss as a job event and stops if the job is no longer its to run (cancelled, or reclaimed after
a lost lease); a non-finite loss fails the job. After every epoch it writes a checkpoint: the
LoRA parameters and AdamW moments as safetensors (nothing is pickled) plus the scheduler and
losses so far as JSON, and records it in the jobs database. `resume` loads the latest one so an
interrupted job continues with the next epoch as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jobs.queue import JobQueue
from trainer.sft import SFTRecipe, TrainResult

STATE_FILE, META_FILE = "state.safetensors", "state.json"


class JobStopped(Exception):
    """The job was cancelled or handed to another sidecar; stop without touching it further."""


class JobInterrupted(Exception):
    """The sidecar is shutting down; the job goes back to the queue."""


class JobFailed(Exception):
    """Training cannot go on; `code` is the OpenAI-style error code the job ends with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class JobRecipe(SFTRecipe):
    """One job's training run.

    Args:
        config: the `TrainConfig` built from the job.
        queue, job_id, worker: where progress goes and the lease that makes it ours.
        work_dir: this job's folder for checkpoints.
        should_stop: polled after every step; True hands the job back to the queue (shutdown).
    """

    def __init__(
        self, config, queue: JobQueue, job_id: str, worker: str, work_dir: Path, log=print, should_stop=lambda: False
    ):
        super().__init__(config, log=log)
        self.queue, self.job_id, self.worker, self.work_dir = queue, job_id, worker, Path(work_dir)
        self.should_stop = should_stop

    def on_step(self, epoch: int, result: TrainResult) -> None:
        step, loss = len(result.step_losses), result.step_losses[-1]
        if not math.isfinite(loss):
            raise JobFailed(
                "nan_loss", f"the training loss became {loss} at step {step}; try a lower learning_rate_multiplier"
            )
        data = {"step": step, "total_steps": self.total_steps, "epoch": epoch + 1, "train_loss": loss}
        if not self.queue.event(
            self.job_id, self.worker, f"Step {step}/{self.total_steps}: training loss={loss:.4f}", "metrics", data
        ):
            raise JobStopped()
        if self.should_stop():
            raise JobInterrupted()

    def on_epoch_end(self, epoch: int, result: TrainResult) -> None:
        metrics = {"train_loss": result.epoch_train_losses[-1]}
        if result.eval_losses:
            metrics["valid_loss"] = result.eval_losses[-1]
            if not math.isfinite(result.eval_losses[-1]):
                raise JobFailed("nan_loss", f"the validation loss became {result.eval_losses[-1]} at epoch {epoch + 1}")
        path = self.save_checkpoint(epoch + 1, result)
        if not self.queue.add_checkpoint(
            self.job_id, self.worker, epoch + 1, len(result.step_losses), str(path), metrics
        ):
            raise JobStopped()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, epochs_done: int, result: TrainResult) -> Path:
        """Write `work_dir/epoch-N/` atomically (a temp folder renamed into place)."""
        final = self.work_dir / f"epoch-{epochs_done}"
        partial = self.work_dir / f".epoch-{epochs_done}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, param in enumerate(self.trainable.trainable_parameters()):
            tensors[f"param.{i}"] = param.detach().to("cpu").contiguous()
            for key, value in self.optimizer.state.get(param, {}).items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value).detach().to("cpu").contiguous()
        save_file(tensors, str(partial / STATE_FILE))
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {
            "epochs_done": epochs_done,
            "scheduler": scheduler,
            "result": {
                "step_losses": result.step_losses,
                "epoch_train_losses": result.epoch_train_losses,
                "eval_losses": result.eval_losses,
                "tokens_seen": result.tokens_seen,
                "targets_seen": result.targets_seen,
                "seconds": result.seconds,
            },
        }
        (partial / META_FILE).write_text(json.dumps(meta))
        for file in partial.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # a run that died after renaming but before recording it
            for file in final.iterdir():
                file.unlink()
            final.rmdir()
        os.replace(partial, final)
        return final

    def resume(self, path: Path | str) -> TrainResult:
        """Load a checkpoint written by `save_checkpoint`; training continues with the next epoch."""
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
        with torch.no_grad():
            for i, param in enumerate(self.trainable.trainable_parameters()):
                param.copy_(tensors[f"param.{i}"].to(param.device))
                # AdamW keeps `step` on the CPU unless capturable; the moments live beside the parameter.
                state = {
                    key.split(".", 2)[2]: value if key.endswith(".step") else value.to(param.device)
                    for key, value in tensors.items()
                    if key.startswith(f"optim.{i}.")
                }
                if state:
                    self.optimizer.state[param] = state
        scheduler = dict(meta["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups))
        self.scheduler.load_state_dict(scheduler)
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.start_epoch = meta["epochs_done"]
        return TrainResult(**meta["result"])

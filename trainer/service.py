"""The trainer sidecar: claim queued fine-tuning jobs, train them one at a time, publish the adapters.

`TrainerService.run()` loops: re-queue jobs whose sidecar died (expired lease), claim the oldest
queued job atomically, train it with `JobRecipe` while a heartbeat thread renews the lease, then
publish the adapter through the server's service route, which validates it like any upload and
marks the job `succeeded`. Bad data, a non-finite loss, running out of memory or any other
training error ends the job `failed` with an OpenAI-style `error`; the sidecar goes on with the
next job. The trainer never imports server code: the shared jobs database and HTTP are the contract.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from adapters.chat_template import TemplateError
from adapters.format import CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE
from jobs.config import JobsConfig
from jobs.db import Database
from jobs.files import FileStore
from jobs.queue import TERMINAL, JobQueue, JobRecord
from trainer.data import DataError
from trainer.job_recipe import JobFailed, JobInterrupted, JobRecipe, JobStopped
from trainer.lora import LoraSpec, parse_target_modules
from trainer.publish import _error_message

log = logging.getLogger("loraswap.trainer")
PUBLISH_ATTEMPTS = 5


@dataclass(frozen=True)
class ServiceConfig:
    """What one sidecar needs. `jobs` must point at the server's jobs database and files."""

    jobs: JobsConfig
    server_url: str
    service_key: str
    base: str = "default"
    device: str = "auto"
    dtype: str = "float32"
    max_length: int = 1024
    lease_s: float = 60.0
    poll_s: float = 2.0
    max_attempts: int = 3
    once: bool = False  # stop when the queue is empty (tests, cron)

    def __post_init__(self):
        if not self.lease_s > 0 or not self.poll_s > 0:
            raise ValueError("lease_s and poll_s must be > 0")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.service_key:
            raise ValueError("service_key is required (--service-key or LORASWAP_SERVICE_KEY)")


class Heartbeat:
    """Renews a job's lease from a thread while it trains; stops when the job is no longer ours."""

    def __init__(self, queue: JobQueue, job_id: str, worker: str, lease_s: float):
        self.queue, self.job_id, self.worker, self.lease_s = queue, job_id, worker, lease_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"heartbeat-{job_id}")

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                if not self.queue.heartbeat(self.job_id, self.worker, self.lease_s):
                    return
            except Exception:  # a locked database for a moment must not kill the lease thread
                log.exception("heartbeat for %s failed", self.job_id)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class TrainerService:
    """One sidecar process's loop. `worker` names it in the database (unique per process)."""

    def __init__(self, config: ServiceConfig, worker: str | None = None):
        self.config = config
        self.worker = worker or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        db = Database(config.jobs.database)
        self.queue, self.files = JobQueue(db), FileStore(db, config.jobs.files)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Process jobs until `stop()` (or, with `once`, until the queue is empty)."""
        log.info("trainer service %s on %s", self.worker, self.config.jobs.database)
        while not self._stop.is_set():
            if not self.run_one() and (self.config.once or self._stop.wait(self.config.poll_s)):
                return

    def run_one(self) -> bool:
        """Reclaim dead jobs, then claim and run one; False when nothing was queued."""
        for job_id in self.queue.reclaim_expired(self.config.max_attempts):
            log.warning("job %s lost its trainer; re-queued or failed", job_id)
        job = self.queue.claim(self.worker, self.config.lease_s)
        if job is None:
            return False
        with Heartbeat(self.queue, job.id, self.worker, self.config.lease_s):
            self.run_job(job)
        final = self.queue.get_any(job.id)
        if final is None or final.status in TERMINAL:  # nothing will resume it: drop its checkpoints
            shutil.rmtree(self.config.jobs.work / job.id, ignore_errors=True)
        return True

    def run_job(self, job: JobRecord) -> None:
        """Train, publish, and end the job (`failed` on any error); never raises for a job's fault."""
        try:
            self._train_and_publish(job)
        except JobStopped:
            log.info("job %s was cancelled or reassigned; stopped", job.id)
        except JobInterrupted:
            self.queue.release(job.id, self.worker)
        except JobFailed as exc:
            self._fail(job, exc.code, exc.message)
        except (DataError, TemplateError) as exc:
            self._fail(job, "invalid_training_file", str(exc))
        except (MemoryError, _oom_error()) as exc:
            _release_device_memory()
            self._fail(
                job,
                "out_of_memory",
                f"training ran out of memory ({type(exc).__name__}); try a smaller batch_size or rank",
            )
        except Exception as exc:  # a job's failure must not end the sidecar
            log.exception("job %s failed", job.id)
            self._fail(job, "training_error", f"{type(exc).__name__}: {exc}")

    def _fail(self, job: JobRecord, code: str, message: str) -> None:
        # The tenant reads this: name files by id, never by the sidecar's paths.
        for file_id in filter(None, (job.training_file, job.validation_file)):
            message = message.replace(str(self.files.path(file_id)), file_id)
        message = message.replace(str(self.config.jobs.resolved_root), "<jobs>")[:2000]
        error = {"code": code, "message": message, "param": None}
        self.queue.finish(job.id, self.worker, "failed", error=error, message=f"Job failed: {message}")

    def train_config(self, job: JobRecord, out: Path):
        from trainer.sft import TrainConfig

        hyper, lora = job.hyperparameters, job.method
        targets = lora["target_modules"]
        spec = LoraSpec(
            rank=lora["rank"],
            alpha=lora["alpha"],
            dropout=lora["dropout"],
            target_modules=parse_target_modules(targets if isinstance(targets, str) else ",".join(targets)),
        )
        data = self._file(job.training_file)
        eval_data = self._file(job.validation_file) if job.validation_file else None
        return TrainConfig(
            data=data,
            out=out,
            base=self.config.base,
            qlora=bool(lora.get("qlora")),
            lora=spec,
            epochs=hyper["n_epochs"],
            lr=hyper["base_learning_rate"] * hyper["learning_rate_multiplier"],
            batch_size=hyper["batch_size"],
            max_length=self.config.max_length,
            eval_data=eval_data,
            seed=job.seed,
            dtype=self.config.dtype,
            device=self.config.device,
            progress=False,
        )

    def _file(self, file_id: str) -> Path:
        path = self.files.path(file_id)
        if not path.is_file():
            raise JobFailed("invalid_training_file", f"the file {file_id} was deleted before training started")
        return path

    def _train_and_publish(self, job: JobRecord) -> None:
        # One folder per attempt: a sidecar wrongly declared dead can never overwrite its successor's files.
        work = self.config.jobs.work / job.id / self.worker
        out = work / "adapter"
        recipe = JobRecipe(
            self.train_config(job, out),
            self.queue,
            job.id,
            self.worker,
            work,
            log=lambda message: log.info("%s: %s", job.id, message),
            should_stop=self._stop.is_set,
        )
        recipe.setup()
        result = None
        checkpoint = self.queue.latest_checkpoint(job.id)
        if checkpoint is not None:
            result = recipe.resume(checkpoint.path)
            self.queue.event(job.id, self.worker, f"Resumed from the checkpoint after epoch {checkpoint.epoch}")
        result = recipe.train(result)
        if not self.queue.holds(job.id, self.worker):
            raise JobStopped()
        recipe.save(result)
        self.publish(job, out, result.tokens_seen)

    def publish(self, job: JobRecord, adapter_dir: Path, trained_tokens: int) -> None:
        """Upload through the server's service route; it marks the job succeeded."""
        url = f"{self.config.server_url.rstrip('/')}/internal/fine_tuning/jobs/{job.id}/adapter"
        headers = {
            "Authorization": f"Bearer {self.config.service_key}",
            "X-Loraswap-Tenant": job.tenant,
            "X-Loraswap-Worker": self.worker,
        }
        present = [f for f in (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE) if (adapter_dir / f).is_file()]
        with ExitStack() as stack, httpx.Client(timeout=600) as client:
            files = [
                ("files", (f, stack.enter_context(open(adapter_dir / f, "rb")), "application/octet-stream"))
                for f in present
            ]
            for attempt in range(PUBLISH_ATTEMPTS):  # the server may be restarting; the lease keeps the job ours
                try:
                    for _, (_, handle, _) in files:
                        handle.seek(0)
                    response = client.post(
                        url, headers=headers, files=files, data={"trained_tokens": str(trained_tokens)}
                    )
                    break
                except httpx.TransportError as exc:
                    if attempt + 1 == PUBLISH_ATTEMPTS:
                        raise JobFailed(
                            "publish_failed", f"could not reach the server at {self.config.server_url}: {exc}"
                        ) from None
                    time.sleep(self.config.poll_s)
        if response.status_code == 409:
            raise JobStopped()
        if response.status_code != 200:
            raise JobFailed(
                "publish_failed", f"the server refused the adapter ({response.status_code}): {_error_message(response)}"
            )


def _release_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next job (and a server on the same GPU) gets the memory back


def _oom_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)

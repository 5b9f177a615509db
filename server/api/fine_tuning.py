"""`/v1/fine_tuning/jobs`: create, list, get, cancel the caller's fine-tuning jobs; their events and checkpoints.

OpenAI's shapes (`fine_tuning.job`, `fine_tuning.job.event`, `fine_tuning.job.checkpoint`, lists
with `has_more`, `after` / `limit` paging). The server only queues the job in the shared jobs
database; the trainer sidecar claims and runs it. LoRA settings ride as an extension inside
`method` (`method.lora`: rank, alpha, dropout, target_modules, qlora). Every field is bounded
here; another tenant's job or file answers exactly like a missing one. Handlers are plain
functions, so FastAPI runs them (and their SQLite calls) in its threadpool, off the event loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import LINEAR_MODULES
from jobs import queue as job_queue
from server.api.deps import get_state, get_tenant
from server.api.errors import BadRequest, Conflict
from server.api.files import QuotaError, owned_file
from server.api.jobs_deps import Jobs, NotFound, get_jobs
from server.state import ServerState

router = APIRouter()

DEFAULT_EPOCHS, DEFAULT_BATCH_SIZE, BASE_LEARNING_RATE = 3, 8, 2e-4
_ID = Field(max_length=80)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"


class LoraSettings(BaseModel):
    """The LoRA extension of `method`."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[Literal[LINEAR_MODULES]] = Field("all-linear", max_length=16)  # type: ignore[valid-type]
    qlora: bool = False


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"] = "supervised"
    supervised: Supervised | None = None
    lora: LoraSettings | None = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=256)
    training_file: str = _ID
    validation_file: str | None = Field(None, max_length=80)
    suffix: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    integrations: list | None = Field(None, max_length=0)


def job_object(job: job_queue.JobRecord) -> dict:
    """The OpenAI `fine_tuning.job` for `job`."""
    hyper = {k: job.hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
    error = dict(job.error) if job.error else None
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "model": job.model,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant,
        "result_files": [],
        "status": job.status,
        "validation_file": job.validation_file,
        "training_file": job.training_file,
        "hyperparameters": hyper,
        "trained_tokens": job.trained_tokens,
        "error": error,
        "seed": job.seed,
        "suffix": job.suffix,
        "estimated_finish": None,
        "integrations": None,
        "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}, "lora": job.method},
    }


def missing_job(job_id: str) -> NotFound:
    return NotFound(
        f"No fine-tuning job with id {job_id[:80]!r}", param="fine_tuning_job_id", code="fine_tuning_job_not_found"
    )


def owned_job(jobs: Jobs, tenant: str, job_id: str) -> job_queue.JobRecord:
    job = jobs.queue.get(tenant, job_id)
    if job is None:
        raise missing_job(job_id)
    return job


def resolve_hyperparameters(body: CreateJob) -> dict:
    """Hyperparameters from `method.supervised` (OpenAI's newer place) or the top level; "auto" filled in."""
    given = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    given = given or body.hyperparameters or Hyperparameters()
    return {
        "n_epochs": DEFAULT_EPOCHS if given.n_epochs == "auto" else given.n_epochs,
        "batch_size": DEFAULT_BATCH_SIZE if given.batch_size == "auto" else given.batch_size,
        "learning_rate_multiplier": 1.0 if given.learning_rate_multiplier == "auto" else given.learning_rate_multiplier,
        "base_learning_rate": BASE_LEARNING_RATE,
    }


@router.post("/v1/fine_tuning/jobs")
def create_job(
    body: CreateJob,
    tenant: str = Depends(get_tenant),
    state: ServerState = Depends(get_state),
    jobs: Jobs = Depends(get_jobs),
):
    if body.model != state.base_id:
        raise BadRequest(
            f"model {body.model[:80]!r} cannot be fine-tuned here; use the base {state.base_id!r}",
            param="model",
            code="model_not_available",
        )
    owned_file(jobs, tenant, body.training_file, param="training_file")
    if body.validation_file is not None:
        owned_file(jobs, tenant, body.validation_file, param="validation_file")
    lora = (body.method.lora if body.method and body.method.lora else None) or LoraSettings()
    if lora.rank > state.config.max_rank:
        raise BadRequest(
            f"method.lora.rank must be <= {state.config.max_rank} (the server's max rank)", param="method.lora.rank"
        )
    try:
        job = jobs.queue.create(
            tenant,
            model=body.model,
            training_file=body.training_file,
            validation_file=body.validation_file,
            suffix=body.suffix,
            seed=body.seed if body.seed is not None else 42,
            hyperparameters=resolve_hyperparameters(body),
            method=lora.model_dump(),
            max_active=jobs.config.max_active_jobs_per_tenant,
        )
    except job_queue.QuotaExceeded as exc:
        raise QuotaError(str(exc)) from None
    return job_object(job)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(
    after: str | None = Query(None, max_length=80),
    limit: int = Query(20, ge=1, le=100),
    tenant: str = Depends(get_tenant),
    jobs: Jobs = Depends(get_jobs),
):
    found, more = jobs.queue.list(tenant, after, limit)
    return {"object": "list", "data": [job_object(j) for j in found], "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, tenant: str = Depends(get_tenant), jobs: Jobs = Depends(get_jobs)):
    return job_object(owned_job(jobs, tenant, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, tenant: str = Depends(get_tenant), jobs: Jobs = Depends(get_jobs)):
    try:
        job = jobs.queue.cancel(tenant, job_id)
    except job_queue.NotCancellable as exc:
        raise Conflict(str(exc), code="job_not_cancellable") from None
    if job is None:
        raise missing_job(job_id)
    return job_object(job)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(
    job_id: str,
    after: str | None = Query(None, max_length=80),
    limit: int = Query(20, ge=1, le=100),
    tenant: str = Depends(get_tenant),
    jobs: Jobs = Depends(get_jobs),
):
    owned_job(jobs, tenant, job_id)
    found, more = jobs.queue.events(job_id, after, limit)
    data = [
        {
            "object": "fine_tuning.job.event",
            "id": e.id,
            "created_at": e.created_at,
            "level": e.level,
            "message": e.message,
            "data": e.data or {},
            "type": e.type,
        }
        for e in found
    ]
    return {"object": "list", "data": data, "has_more": more}


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    job_id: str,
    after: str | None = Query(None, max_length=80),
    limit: int = Query(10, ge=1, le=100),
    tenant: str = Depends(get_tenant),
    jobs: Jobs = Depends(get_jobs),
):
    job = owned_job(jobs, tenant, job_id)
    found, more = jobs.queue.checkpoints(job_id, after, limit)
    data = [
        {
            "object": "fine_tuning.job.checkpoint",
            "id": c.id,
            "created_at": c.created_at,
            "fine_tuned_model_checkpoint": f"{job_queue.fine_tuned_name(job)}:ckpt-step-{c.step_number}",
            "fine_tuning_job_id": job_id,
            "step_number": c.step_number,
            "metrics": {"step": c.step_number, **c.metrics},
        }
        for c in found
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }

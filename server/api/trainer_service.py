"""`POST /internal/fine_tuning/jobs/{job_id}/adapter`: the trainer sidecar publishes a job's adapter.

The only route that accepts the service credential, and the only place a caller may act in
another namespace: `Authorization: Bearer <service key>` plus `X-Loraswap-Tenant` naming the job's
owner and `X-Loraswap-Worker` naming the sidecar that holds the job's lease. The adapter name comes
from the job (`jobs.queue.fine_tuned_name`), never from the caller, and the upload goes through
the same staging and validation as `POST /v1/adapters`. Publishing and marking the job
`succeeded` happen together: a job that was cancelled or handed to another sidecar meanwhile
gets 409 and its adapter is withdrawn. Tenant keys never work here; the service key works nowhere else.
"""

from __future__ import annotations

import hmac
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters.validate import check_template, validate_adapter_dir
from jobs.queue import fine_tuned_name
from server.api.adapters import staged_name
from server.api.deps import get_state
from server.api.errors import Conflict, Unauthorized, UploadRejected
from server.api.jobs_deps import Jobs, get_jobs
from server.state import ServerState

router = APIRouter()

TENANT_HEADER, WORKER_HEADER = "x-loraswap-tenant", "x-loraswap-worker"
_CHUNK = 1 << 20


def service_caller(request: Request) -> tuple[str, str]:
    """(tenant, worker) named by a caller holding the service key; 401 for anyone else."""
    key = get_jobs(request).config.service_key
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if not key or scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), key.encode()):
        raise Unauthorized("this route needs the trainer service key")
    tenant, worker = request.headers.get(TENANT_HEADER, ""), request.headers.get(WORKER_HEADER, "")
    if not tenant or not worker:
        raise Unauthorized(f"the service key must name {TENANT_HEADER} and {WORKER_HEADER}")
    return tenant, worker


def _stage(files: list[tuple[str, UploadFile]], directory: Path, limit: int) -> None:
    total = 0
    for name, upload in files:
        upload.file.seek(0)
        with open(directory / name, "wb") as out:
            while chunk := upload.file.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise UploadRejected(
                        f"the adapter is over the {limit}-byte cap", status=413, code="adapter_too_large"
                    )
                out.write(chunk)


def _validate(state: ServerState, staging: Path):
    validated = validate_adapter_dir(
        staging, state.base_info, max_rank=state.config.max_rank, max_bytes=state.config.max_upload_bytes
    )
    check_template(validated.provenance, state.base_info, False)
    return validated


@router.post("/internal/fine_tuning/jobs/{job_id}/adapter")
async def publish_job_adapter(
    job_id: str,
    request: Request,
    caller: tuple[str, str] = Depends(service_caller),
    state: ServerState = Depends(get_state),
    jobs: Jobs = Depends(get_jobs),
):
    tenant, worker = caller
    job = await run_in_threadpool(jobs.queue.get, tenant, job_id)
    if job is None or job.status != "running" or job.worker != worker:
        raise Conflict(
            "this job is not running under that worker (cancelled, finished or reassigned)", code="job_not_held"
        )
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > state.config.max_upload_bytes + _CHUNK:
        raise UploadRejected(
            "send the adapter with a Content-Length within the upload cap", status=413, code="adapter_too_large"
        )
    staging = Path(tempfile.mkdtemp(prefix="loraswap-job-"))
    form = await request.form(max_files=8, max_fields=4)
    try:
        files = []
        for upload in form.getlist("files"):
            if isinstance(upload, UploadFile):
                files.append((staged_name(upload), upload))
        await run_in_threadpool(_stage, files, staging, state.config.max_upload_bytes)
        validated = await run_in_threadpool(_validate, state, staging)
        name = fine_tuned_name(job)
        record, created = await state.publish(tenant, name, validated, state.pools.upload)
    finally:
        await form.close()
        shutil.rmtree(staging, ignore_errors=True)
    trained = form.get("trained_tokens")
    trained_tokens = int(trained) if isinstance(trained, str) and trained.isdigit() else None
    done = await run_in_threadpool(
        lambda: jobs.queue.finish(
            job_id,
            worker,
            "succeeded",
            fine_tuned_model=name,
            trained_tokens=trained_tokens,
            message=f"New fine-tuned model created: {name}. The job has successfully completed",
        )
    )
    if not done:
        if created:
            await run_in_threadpool(state.store.delete, tenant, name)
        raise Conflict(
            "the job was cancelled or reassigned while its adapter was published; withdrawn", code="job_not_held"
        )
    return {"fine_tuned_model": name, "adapter_id": record.id, "version": record.version}

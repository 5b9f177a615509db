"""`/v1/files`: upload, list, get, read and delete the caller's training files (OpenAI's files API).

An upload is multipart (`file`, `purpose=fine-tune`), capped by its declared length before the
body is read, and checked line by line with the trainer's own conversation checks
(`jobs.data_format`, rendered by the served chat template) off the event loop: a bad file gets
a 400 listing its first bad lines. Count and byte quotas are per tenant. Another tenant's file
answers exactly like a missing one.
"""

from __future__ import annotations

import unicodedata
from pathlib import PurePosixPath

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from jobs import files as files_store
from jobs.data_format import check_jsonl, format_errors
from server.api.deps import get_state, get_tenant
from adapters.errors import LoraswapError
from server.errors import BadRequest, UploadRejected
from server.api.jobs_deps import Jobs, NotFound, get_jobs
from server.state import ServerState

router = APIRouter()

PURPOSES = ("fine-tune",)
_FORM_OVERHEAD = 64 * 1024


class QuotaError(LoraswapError):
    status, type, code = 429, "rate_limit_error", "quota_exceeded"


def file_object(record: files_store.FileRecord) -> dict:
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def missing_file(file_id: str, param: str | None = "file_id") -> NotFound:
    return NotFound(f"No such File object: {file_id[:80]!r}", param=param, code="file_not_found")


def owned_file(jobs: Jobs, tenant: str, file_id: str, param: str | None = "file_id") -> files_store.FileRecord:
    record = jobs.files.get(tenant, file_id)
    if record is None:
        raise missing_file(file_id, param)
    return record


def _clean_filename(name: str | None) -> str:
    """The client's base name as metadata only (never a path): printable, at most 255 characters."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C")
    return base[:255] or "upload.jsonl"


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None or not declared.isdigit():
        raise UploadRejected("send the upload with a Content-Length header", status=411, code="length_required")
    if int(declared) > limit + _FORM_OVERHEAD:
        raise UploadRejected(f"the file is over the {limit}-byte cap", status=413, code="file_too_large", param="file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRejected(
            "upload files as multipart/form-data (fields: file, purpose)", status=415, code="unsupported_media_type"
        )


@router.post("/v1/files")
async def upload_file(
    request: Request,
    tenant: str = Depends(get_tenant),
    state: ServerState = Depends(get_state),
    jobs: Jobs = Depends(get_jobs),
):
    limit = jobs.config.max_file_bytes
    _check_length(request, limit)
    form = await request.form(max_files=1, max_fields=4)
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose not in PURPOSES:
            raise BadRequest(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
        if not isinstance(upload, UploadFile):
            raise BadRequest("the form field 'file' is required", param="file")
        content = await upload.read(limit + 1)
        if len(content) > limit:
            raise UploadRejected(
                f"the file is over the {limit}-byte cap", status=413, code="file_too_large", param="file"
            )
        filename = _clean_filename(upload.filename)
    finally:
        await form.close()
    check = await run_in_threadpool(check_jsonl, content, state.template, jobs.config.max_lines_per_file)
    if check.errors:
        raise BadRequest(f"{filename}: " + format_errors(list(check.errors)), param="file", code="invalid_file")
    try:
        record = await run_in_threadpool(
            jobs.files.create,
            tenant,
            filename,
            purpose,
            content,
            check.lines,
            max_files=jobs.config.max_files_per_tenant,
            max_bytes=jobs.config.max_bytes_per_tenant,
        )
    except files_store.QuotaExceeded as exc:
        raise QuotaError(str(exc), param="file") from None
    return file_object(record)


@router.get("/v1/files")
def list_files(
    purpose: str | None = Query(None, max_length=32),
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = Query(None, max_length=80),
    tenant: str = Depends(get_tenant),
    jobs: Jobs = Depends(get_jobs),
):
    records = jobs.files.list(tenant, purpose)
    if after is not None:
        ids = [r.id for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    page = records[:limit]
    return {
        "object": "list",
        "data": [file_object(r) for r in page],
        "has_more": len(records) > limit,
        "first_id": page[0].id if page else None,
        "last_id": page[-1].id if page else None,
    }


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, tenant: str = Depends(get_tenant), jobs: Jobs = Depends(get_jobs)):
    return file_object(owned_file(jobs, tenant, file_id))


@router.get("/v1/files/{file_id}/content")
def get_file_content(file_id: str, tenant: str = Depends(get_tenant), jobs: Jobs = Depends(get_jobs)):
    record = owned_file(jobs, tenant, file_id)
    return Response(jobs.files.path(record.id).read_bytes(), media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, tenant: str = Depends(get_tenant), jobs: Jobs = Depends(get_jobs)):
    if not jobs.files.delete(tenant, file_id):
        raise missing_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}

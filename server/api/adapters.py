"""`/v1/adapters`: upload, list, get, delete, pin / unpin the caller's adapters.

An upload is a multipart form: `name`, the files in `files` (`adapter_config.json`,
`adapter_model.safetensors`, optional `loraswap.json`) and optional `allow_template_mismatch`.
Files are staged in a fresh temporary directory under server-chosen names (a client's file name
only selects one of the known names; anything else is refused), validated against the loaded
base off the event loop, checked against the template contract, then published to the store,
which renames atomically. Any rejection leaves the store as it was.

Uploads are bounded before their body is read: `server.edge` caps the body at
`max_upload_bytes` while it streams (chunked too) and gives it a read deadline, and the upload
gate admits a few at a time (429 per tenant, 503 overall). Staging, validation and publishing
run in the upload pool, never on the event loop or in the pool merges use.

The card an upload answers with shows only the caller's own residency and pins, so uploading
bytes another tenant already has answers exactly like fresh bytes (201, on disk, not pinned).

Every lookup is inside the caller's namespace, so another tenant's adapter answers exactly like a
missing one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData, UploadFile

from adapters.errors import InvalidAdapter
from adapters.store import AdapterRecord, check_name
from adapters.validate import ALLOWED_FILES, check_template, refuse_forbidden_name, unknown_file, validate_adapter_dir
from server.api.deps import get_state, get_tenant
from server.api.errors import Conflict, UploadRejected
from server.api.protocol import AdapterCard, AdapterDeleted, AdapterList
from server.engine.types import AdapterRef, AdapterResidency
from server.state import ServerState

router = APIRouter()

_TRUE = ("1", "true", "yes", "on")
_CHUNK = 1 << 20


def adapter_card(record: AdapterRecord, residency: dict[str, AdapterResidency] | None = None) -> AdapterCard:
    where = (residency or {}).get(record.id, AdapterResidency())
    return AdapterCard(
        id=record.id,
        name=record.name,
        version=record.version,
        sha256=record.sha256,
        rank=record.rank,
        target_modules=sorted(record.target_modules),
        template=record.template_sha256 or "unknown",
        created_at=record.created_at,
        residency=where.tier,
        folded=where.folded,
        pinned=where.pinned,
    )


def staged_name(upload: UploadFile) -> str:
    """The known file name a client's upload stands for; anything else is refused.

    The refusals are `validate_adapter_dir`'s own (same codes and statuses), decided from the
    client's base name alone: no client-named file is ever written.
    """
    client_name = PurePosixPath((upload.filename or "").replace("\\", "/")).name
    if client_name in ALLOWED_FILES:
        return next(known for known in ALLOWED_FILES if known == client_name)
    refuse_forbidden_name(client_name, param="files")
    raise unknown_file(client_name or "(unnamed file)", param="files")


def _stage(files: list[tuple[str, UploadFile]], directory: Path, limit: int) -> None:
    """Copy uploads into `directory` (blocking; run in a thread), refusing more than `limit` bytes."""
    total = 0
    for name, upload in files:
        upload.file.seek(0)
        with open(directory / name, "wb") as out:
            while chunk := upload.file.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise InvalidAdapter(
                        f"the adapter is over the {limit}-byte cap", "adapter_too_large", 413, param="files"
                    )
                out.write(chunk)


def _check_request(request: Request) -> None:
    # The body's size was capped by server.edge before this handler ran.
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRejected(
            "upload adapters as multipart/form-data (fields: name, files)", status=415, code="unsupported_media_type"
        )


def _read_form(form: FormData) -> tuple[str, list[tuple[str, UploadFile]], bool]:
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise UploadRejected("the form field 'name' is required", param="name")
    check_name(name)
    uploads = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
    if not uploads:
        raise UploadRejected("no files uploaded in the form field 'files'", param="files")
    files: list[tuple[str, UploadFile]] = []
    for upload in uploads:
        known = staged_name(upload)
        if any(known == seen for seen, _ in files):
            raise UploadRejected(f"{known} was uploaded twice", code="duplicate_file", param="files")
        files.append((known, upload))
    allow = str(form.get("allow_template_mismatch", "false")).strip().lower() in _TRUE
    return name, files, allow


def _validate(state: ServerState, staging: Path, allow_template_mismatch: bool):
    """Blocking validation against the base and the template contract (run in a thread)."""
    validated = validate_adapter_dir(
        staging, state.base_info, max_rank=state.config.max_rank, max_bytes=state.config.max_upload_bytes
    )
    check_template(validated.provenance, state.base_info, allow_template_mismatch)
    return validated


@router.post("/v1/adapters")
async def upload_adapter(request: Request, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    try:
        with state.pools.uploads.hold(tenant):  # before the body is read: 429 / 503 cost nothing
            record, created = await _upload(request, tenant, state)
    except Exception as exc:
        state.metrics.uploads.labels(str(getattr(exc, "status", getattr(exc, "status_code", 400)))).inc()
        raise
    status = 201 if created else 200
    state.metrics.uploads.labels(str(status)).inc()
    return JSONResponse(adapter_card(record, state.residency(tenant)).model_dump(), status_code=status)


async def _upload(request: Request, tenant: str, state: ServerState):
    pools = state.pools
    staging = Path(await pools.run(pools.upload, tempfile.mkdtemp, prefix="loraswap-upload-"))
    form = None
    try:
        _check_request(request)
        form = await request.form(max_files=8, max_fields=8)
        name, files, allow = _read_form(form)
        await pools.run(pools.upload, _stage, files, staging, state.config.max_upload_bytes)
        validated = await pools.run(pools.upload, _validate, state, staging, allow)
        if state.is_deleting(tenant, name):
            raise Conflict(
                f"the adapter '{name}' is being deleted; retry once its requests have finished",
                headers={"Retry-After": str(state.config.retry_after_s)},
            )
        return await state.publish(tenant, name, validated, pools.upload)
    finally:
        if form is not None:
            await form.close()
        await pools.run(pools.upload, shutil.rmtree, staging, ignore_errors=True)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    records = await state.alist_adapters(tenant)
    residency = state.residency(tenant)
    return AdapterList(data=[adapter_card(record, residency) for record in records])


@router.get("/v1/adapters/{name}", response_model=AdapterCard)
async def get_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    return adapter_card(await state.aget_adapter(tenant, name), state.residency(tenant))


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted)
async def delete_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    """New requests get 404 at once; answers once the deletion is durable in the store.

    Requests already in flight (on any version) finish; the blobs go once none reads them.
    """
    record = await state.delete_adapter(tenant, name)
    return AdapterDeleted(id=record.id, name=record.name)


async def _set_pin(name: str, tenant: str, state: ServerState, pinned: bool) -> AdapterCard:
    record = await state.aget_adapter(tenant, name)
    if pinned:
        state.pins.pin(tenant, AdapterRef(id=record.id, path=await state.aadapter_dir(record)))
    else:
        state.pins.unpin(tenant, record.id)
    card = adapter_card(record, state.residency(tenant))
    card.pinned = pinned  # the engine applies the command between steps; report what was asked
    return card


@router.post("/v1/adapters/{name}/pin", response_model=AdapterCard)
async def pin_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    """Fold this adapter into dense weights (the engine folds it while its traffic allows)."""
    return await _set_pin(name, tenant, state, True)


@router.post("/v1/adapters/{name}/unpin", response_model=AdapterCard)
async def unpin_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    return await _set_pin(name, tenant, state, False)

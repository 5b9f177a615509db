"""`/v1/adapters`: upload, list, get, delete, pin / unpin the caller's adapters.

An upload is a multipart form: `name`, the files in `files` (`adapter_config.json`,
`adapter_model.safetensors`, optional `loraswap.json`) and optional `allow_template_mismatch`.
Files are staged in a fresh temporary directory under server-chosen names (a client's file name
only selects one of the known names; anything else is refused), validated against the loaded
base off the event loop, checked against the template contract, then published to the store,
which renames atomically. Any rejection leaves the store as it was.

Every lookup is inside the caller's namespace, so another tenant's adapter answers exactly like a
missing one.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path, PurePosixPath

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapters.format import CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE
from server.api.deps import get_state, get_tenant
from server.api.errors import ApiError, UploadRejected
from server.api.protocol import AdapterCard, AdapterDeleted, AdapterList
from server.engine.types import AdapterRef
from server.state import ServerState

router = APIRouter()

KNOWN_FILES = (CONFIG_FILE, WEIGHTS_FILE, PROVENANCE_FILE)
# Formats that can run code when loaded: named as such, so the client learns why.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".pyc", ".so", ".npy", ".npz")
_TRUE = ("1", "true", "yes", "on")
_CHUNK = 1 << 20


def adapter_card(record, residency: dict | None = None) -> AdapterCard:
    info = (residency or {}).get(record.id, {})
    return AdapterCard(
        id=record.id, name=record.name, version=record.version, sha256=record.sha256, rank=record.rank,
        target_modules=sorted(record.target_modules), template=record.template_sha256 or "unknown",
        created_at=record.created_at, residency=info.get("residency", "disk"),
        folded=bool(info.get("folded", False)), pinned=bool(info.get("pinned", False)),
    )


def staged_name(upload: UploadFile) -> str:
    """The known file name a client's upload stands for; refuses anything else (415)."""
    client_name = PurePosixPath((upload.filename or "").replace("\\", "/")).name
    for known in KNOWN_FILES:
        if client_name == known:
            return known
    if client_name.lower().endswith(UNSAFE_SUFFIXES):
        raise UploadRejected(
            f"{client_name!r}: pickle and code files are refused; upload {WEIGHTS_FILE} (safetensors)",
            status=415, code="unsafe_file", param="files",
        )
    raise UploadRejected(
        f"{client_name or '(unnamed file)'!r} is not an adapter file; expected {', '.join(KNOWN_FILES)}",
        status=415, code="unsupported_file", param="files",
    )


def _stage(files: list[tuple[str, UploadFile]], directory: Path, limit: int) -> None:
    """Copy uploads into `directory` (blocking; run in a thread), refusing more than `limit` bytes."""
    total = 0
    for name, upload in files:
        upload.file.seek(0)
        with open(directory / name, "wb") as out:
            while chunk := upload.file.read(_CHUNK):
                total += len(chunk)
                if total > limit:
                    raise UploadRejected(f"the upload is larger than the {limit} byte limit", status=413,
                                         code="upload_too_large", param="files")
                out.write(chunk)


async def _read_upload_form(request: Request, limit: int) -> tuple[str, list[tuple[str, UploadFile]], bool]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _CHUNK:  # a little room for form overhead
        raise UploadRejected(f"the upload is larger than the {limit} byte limit", status=413,
                             code="upload_too_large")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRejected("upload adapters as multipart/form-data (fields: name, files)", status=415,
                             code="unsupported_media_type")
    form = await request.form(max_files=8, max_fields=8)
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise UploadRejected("the form field 'name' is required", param="name")
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
    from adapters.validate import check_template, validate_adapter_dir

    validated = validate_adapter_dir(staging, state.base_info, max_rank=state.config.max_rank)
    check_template(validated.provenance, state.base_info, allow_template_mismatch)
    return validated


@router.post("/v1/adapters")
async def upload_adapter(request: Request, tenant: str = Depends(get_tenant),
                         state: ServerState = Depends(get_state)):
    staging = Path(tempfile.mkdtemp(prefix="loraswap-upload-"))
    try:
        name, files, allow = await _read_upload_form(request, state.config.max_upload_bytes)
        await run_in_threadpool(_stage, files, staging, state.config.max_upload_bytes)
        await run_in_threadpool(_validate, state, staging, allow)
        record, created = await run_in_threadpool(state.store.publish, tenant, name, staging)
    except ApiError as exc:
        state.metrics.uploads.labels(str(exc.status)).inc()
        raise
    except Exception as exc:
        state.metrics.uploads.labels(str(getattr(exc, "status", 400))).inc()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    status = 201 if created else 200
    state.metrics.uploads.labels(str(status)).inc()
    return JSONResponse(adapter_card(record, state.residency()).model_dump(), status_code=status)


# POST /v1/adapters/merge belongs here, before the `/{name}` routes: parse the request (sources by
# name in the caller's namespace, method, weights), resolve each with `state.store.get(tenant, ...)`,
# run `adapters.merge` in a thread writing a PEFT directory into a staging dir, then publish it the
# same way `upload_adapter` does (validate -> store.publish -> 201 / 200 + `adapter_card`).


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    residency = state.residency()
    return AdapterList(data=[adapter_card(record, residency) for record in state.store.list(tenant)])


@router.get("/v1/adapters/{name}", response_model=AdapterCard)
async def get_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    return adapter_card(state.store.get(tenant, name), state.residency())


@router.delete("/v1/adapters/{name}", response_model=AdapterDeleted)
async def delete_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    """New requests get 404 at once; the engine forgets the adapter once those in flight finish."""
    record = state.store.get(tenant, name)
    await run_in_threadpool(state.store.delete, tenant, name)
    state.inflight.when_idle(record.id, lambda: state.engine.forget_adapter(record.id))
    return AdapterDeleted(id=record.id, name=record.name)


async def _set_pin(name: str, tenant: str, state: ServerState, pinned: bool) -> AdapterCard:
    record = state.store.get(tenant, name)
    if pinned:
        state.engine.pin(AdapterRef(id=record.id, path=state.store.adapter_dir(record)))
    else:
        state.engine.unpin(record.id)
    return adapter_card(record, state.residency())


@router.post("/v1/adapters/{name}/pin", response_model=AdapterCard)
async def pin_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    """Fold this adapter into dense weights (the engine folds it while its traffic allows)."""
    return await _set_pin(name, tenant, state, True)


@router.post("/v1/adapters/{name}/unpin", response_model=AdapterCard)
async def unpin_adapter(name: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    return await _set_pin(name, tenant, state, False)

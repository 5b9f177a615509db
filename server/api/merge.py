"""`POST /v1/adapters/merge`: combine the caller's own adapters into a new one in their namespace.

The sources are looked up by name in the caller's namespace only (another tenant's name answers
like a missing one). `adapters.merge.merge_adapters` does the math off the event loop; the result
is written as a PEFT directory into a staging folder and then goes through exactly the path of an
upload: validation against the base, then an atomic publish (201 new, 200 same content).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from adapters.format import read_peft, write_peft
from adapters.merge import MergeInput, merge_adapters
from adapters.provenance import read_provenance
from adapters.store import check_name
from adapters.validate import validate_adapter_dir
from server.api.adapters import adapter_card
from server.api.deps import get_state, get_tenant
from server.api.errors import Conflict
from server.state import ServerState

router = APIRouter()


class MergeSource(BaseModel):
    name: str = Field(min_length=1)
    weight: float = 1.0


class MergeRequest(BaseModel):
    name: str = Field(min_length=1)
    method: str
    adapters: list[MergeSource] = Field(min_length=1, max_length=16)
    density: float = 0.5
    rank: int | None = None
    seed: int = 0


def _merge_into(state: ServerState, sources: list[tuple], body: MergeRequest, staging: Path):
    """Blocking: read the sources, merge, write and validate the result (run in a thread)."""
    inputs = [
        MergeInput(weights=read_peft(directory), weight=source.weight,
                   provenance=read_provenance(directory), name=source.name)
        for source, directory in sources
    ]
    result = merge_adapters(inputs, body.method, density=body.density, rank=body.rank, seed=body.seed,
                            max_rank=state.config.max_rank)
    write_peft(result.weights, staging, provenance=result.provenance)
    # The inputs already passed the template contract at their upload; the merge keeps their template.
    return validate_adapter_dir(staging, state.base_info, max_rank=state.config.max_rank,
                                max_bytes=state.config.max_upload_bytes)


@router.post("/v1/adapters/merge")
async def merge(body: MergeRequest, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    check_name(body.name)
    if state.is_deleting(tenant, body.name):
        raise Conflict(f"the adapter '{body.name}' is being deleted; retry once its requests have finished",
                       headers={"Retry-After": str(state.config.retry_after_s)})
    sources = []
    for source in body.adapters:
        record = state.get_adapter(tenant, source.name)
        sources.append((source, state.store.adapter_dir(record)))
    staging = Path(tempfile.mkdtemp(prefix="loraswap-merge-"))
    try:
        validated = await run_in_threadpool(_merge_into, state, sources, body, staging / "adapter")
        record, created = await run_in_threadpool(state.store.publish, tenant, body.name, validated)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return JSONResponse(adapter_card(record, state.residency()).model_dump(), status_code=201 if created else 200)

"""`POST /v1/adapters/merge`: combine the caller's own adapters into a new one in their namespace.

The sources are looked up by name in the caller's namespace only (another tenant's name answers
like a missing one). `adapters.merge.merge_adapters` does the math off the event loop; the result
is written as a PEFT directory into a staging folder and then goes through exactly the path of an
upload: validation against the base, then an atomic publish (201 new, 200 same content).

Merges are CPU-heavy, so they run in their own bounded pool behind their own gate (one per tenant
at a time, `max_concurrent_merges` overall; 429 / 503 beyond), apart from uploads and from
Starlette's pool. The sources are held while they are read: they count as in use (a DELETE or a
version pruning never collects their blobs mid-read) and the store holds them too.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

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


MAX_MERGE_WEIGHT = 100.0  # |weight| beyond this is never a useful merge, and overflows float32 math


class MergeSource(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(default=1.0, ge=-MAX_MERGE_WEIGHT, le=MAX_MERGE_WEIGHT, allow_inf_nan=False)


class MergeRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    method: str = Field(max_length=32)
    adapters: list[MergeSource] = Field(min_length=1, max_length=16)
    density: float = Field(default=0.5, ge=0, le=1, allow_inf_nan=False)
    rank: int | None = Field(default=None, ge=1, le=4096)
    seed: int = Field(default=0, ge=-(2**63), le=2**63 - 1)


def _merge_into(state: ServerState, sources: list[tuple], body: MergeRequest, staging: Path):
    """Blocking: read the sources, merge, write and validate the result (run in a thread)."""
    with ExitStack() as held:
        for _, record, _ in sources:
            held.enter_context(state.store.hold(record))  # pruning or a delete meanwhile keeps the blob
        inputs = [
            MergeInput(
                weights=read_peft(directory),
                weight=source.weight,
                provenance=read_provenance(directory),
                name=source.name,
            )
            for source, _, directory in sources
        ]
    result = merge_adapters(
        inputs, body.method, density=body.density, rank=body.rank, seed=body.seed, max_rank=state.config.max_rank
    )
    write_peft(result.weights, staging, provenance=result.provenance)
    # The inputs already passed the template contract at their upload; the merge keeps their template.
    return validate_adapter_dir(
        staging, state.base_info, max_rank=state.config.max_rank, max_bytes=state.config.max_upload_bytes
    )


@router.post("/v1/adapters/merge")
async def merge(body: MergeRequest, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    check_name(body.name)
    if state.is_deleting(tenant, body.name):
        raise Conflict(
            f"the adapter '{body.name}' is being deleted; retry once its requests have finished",
            headers={"Retry-After": str(state.config.retry_after_s)},
        )
    with state.pools.merges.hold(tenant):
        record, created = await _merge(state, tenant, body)
    return JSONResponse(adapter_card(record, state.residency(tenant)).model_dump(), status_code=201 if created else 200)


async def _merge(state: ServerState, tenant: str, body: MergeRequest):
    pools = state.pools
    records = [await state.aget_adapter(tenant, source.name) for source in body.adapters]
    # Counted in use from here (no await since the lookups): a DELETE now waits for us, and
    # garbage collection skips these blobs until the merge has read them.
    for record in records:
        state.inflight.enter(tenant, record.id, record.sha256)
    try:
        sources = [(source, record, await state.aadapter_dir(record)) for source, record in zip(body.adapters, records)]
        staging = Path(tempfile.mkdtemp(prefix="loraswap-merge-"))
        try:
            validated = await pools.run(pools.merge, _merge_into, state, sources, body, staging / "adapter")
        finally:
            await pools.run(pools.merge, shutil.rmtree, staging, ignore_errors=True)
    finally:
        for record in records:
            state.inflight.leave(tenant, record.id)
    return await state.publish(tenant, body.name, validated, pools.merge)

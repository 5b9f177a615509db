"""Operational endpoints: `/health` (the process is alive), `/ready` (the model is loaded and the
server is not draining), `/metrics` (Prometheus text format, this app's registry only)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.api.deps import get_state
from server.api.errors import error_response
from server.metrics import CONTENT_TYPE
from server.state import ServerState

router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: ServerState = Depends(get_state)):
    if not state.ready or state.admission.draining:
        return error_response(503, "the model is not loaded yet or the server is draining", "server_error", "not_ready")
    return {"status": "ready", "model": state.base_id}


@router.get("/metrics")
async def metrics(state: ServerState = Depends(get_state)):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)

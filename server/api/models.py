"""`GET /v1/models`: the base and the caller's adapters in OpenAI's list shape.

Adapters are listed under their names in the caller's namespace (`owned_by` = tenant) with
loraswap's extra fields: residency (device / host / disk), fold and pin state, version, sha256.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.deps import get_state, get_tenant
from server.api.protocol import ModelCard, ModelList
from server.engine.types import AdapterResidency
from server.state import ServerState

router = APIRouter()


def _created(record) -> int:
    value = getattr(record, "created_at", 0)
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _cards(state: ServerState, tenant: str, records: list) -> list[ModelCard]:
    cards = [
        ModelCard(
            id=state.base_id,
            created=state.created,
            owned_by="loraswap",
            root=state.base_id,
            max_model_len=state.max_model_len,
        )
    ]
    residency = state.residency(tenant)
    for record in records:
        where = residency.get(record.id, AdapterResidency())
        cards.append(
            ModelCard(
                id=record.name,
                created=_created(record),
                owned_by=tenant,
                root=state.base_id,
                parent=state.base_id,
                max_model_len=state.max_model_len,
                residency=where.tier,
                folded=where.folded,
                pinned=where.pinned,
                version=record.version,
                sha256=record.sha256,
            )
        )
    return cards


@router.get("/v1/models", response_model=ModelList, response_model_exclude_none=True)
async def list_models(tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    return ModelList(data=_cards(state, tenant, await state.alist_adapters(tenant)))


@router.get("/v1/models/{model:path}", response_model=ModelCard, response_model_exclude_none=True)
async def retrieve_model(model: str, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    await state.aresolve_model(tenant, model)  # 404 model_not_found, exactly as chat completions answer
    return next(card for card in _cards(state, tenant, await state.alist_adapters(tenant)) if card.id == model)

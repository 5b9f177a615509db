"""`POST /tokenize` (vLLM-compatible): the prompt ids chat completions would send to the engine.

It runs exactly the chat path up to the engine: resolve `model`, refuse a request template,
structural bounds, then validate -> render -> length check off the event loop (with
`max_tokens` when given).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api.deps import get_state, get_tenant
from server.api.errors import BadRequest
from server.api.protocol import TokenizeRequest, TokenizeResponse
from server.bounds import check_lengths
from server.state import ServerState

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, tenant: str = Depends(get_tenant), state: ServerState = Depends(get_state)):
    if body.chat_template is not None:
        raise BadRequest("a request may not supply its own chat template; the base's is used", param="chat_template")
    await state.aresolve_model(tenant, body.model)
    if body.max_tokens is not None:
        check_lengths(body.max_tokens, None, 0, state.max_model_len)
    prompt, _ = await state.render_prompt(
        body.messages,
        max_tokens=body.max_tokens,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
    )
    return TokenizeResponse(count=len(prompt.ids), max_model_len=state.max_model_len, tokens=prompt.ids)

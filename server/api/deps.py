"""FastAPI dependencies shared by the routers: the app's state and the caller's tenant.

Auth (done first by `server.edge.Edge`, before the body) maps `Authorization: Bearer <key>` to a
tenant by comparing the key with every configured key in constant time (`hmac.compare_digest`,
no early exit), so response timing does not reveal how much of a key matched or which tenant it
belongs to. With no keys configured, auth is off and
every caller is tenant `default`.
"""

from __future__ import annotations

from fastapi import Request

from server.api.errors import Unauthorized
from server.edge import tenant_for_key
from server.settings import DEFAULT_TENANT
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.loraswap


def get_tenant(request: Request) -> str:
    """The calling tenant; 401 in OpenAI's envelope for a missing or unknown key.

    `server.edge.Edge` has normally authenticated the request before its body was read; this
    check stays for an app mounted without it.
    """
    tenant = getattr(request.state, "tenant", None)
    if tenant is not None:
        return tenant
    state = get_state(request)
    if not state.config.auth_enabled:
        return DEFAULT_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = tenant_for_key(state.config.api_keys, key.strip())
    if tenant is None:
        raise Unauthorized("incorrect API key provided")
    return tenant

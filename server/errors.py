"""The server's domain errors: what admission, state, uploads and chat refuse, each with its status.

Core modules (state, admission, generation) and the routers raise these; the one handler in
`server/api/errors.py` answers them in OpenAI's envelope. All derive from
`adapters.errors.LoraswapError`, the same base as the adapter library's and the engine's errors,
so none of these modules imports the API layer. To add an error: subclass `LoraswapError` (here,
or next to the code that raises it) and set `status`, `type` and `code`; nothing else changes.
"""

from __future__ import annotations

from adapters.errors import LoraswapError
from server.engine.errors import PromptTooLong

__all__ = [
    "BadRequest",
    "Conflict",
    "EngineFailure",
    "Overloaded",
    "PromptTooLong",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "Unauthorized",
    "UploadRejected",
]


class BadRequest(LoraswapError):
    status, code = 400, "invalid_request"


class Unauthorized(LoraswapError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class RequestTimeout(LoraswapError):
    """A request body that did not arrive within its read deadline (`server.edge`)."""

    status, code = 408, "request_timeout"


class RequestTooLarge(LoraswapError):
    """A request body over its size cap, refused before (or while) it is read (`server.edge`)."""

    status, code = 413, "request_too_large"


class Conflict(LoraswapError):
    status, code = 409, "conflict"


class RateLimited(LoraswapError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Overloaded(LoraswapError):
    status, type, code = 503, "server_error", "server_overloaded"


class EngineFailure(LoraswapError):
    """The engine could not serve a request it accepted (e.g. an adapter failed to load)."""

    status, type, code = 500, "server_error", "engine_error"


class UploadRejected(LoraswapError):
    """An upload refused before validation (size, file names, form fields)."""

    status, code = 400, "invalid_upload"

"""The one place that turns every exception into OpenAI's error envelope.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`. Core code
raises `LoraswapError`s (the server's in `server/errors.py`, the adapter library's, the chat
template's and the engine's), which carry their own status, code and param, so one handler
answers them all. Request-body validation errors become 400 in the same envelope instead of
FastAPI's 422 shape. A 500 means a bug and is logged with its traceback.

The server's error classes are re-exported here so routers keep one import line for them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import LoraswapError, envelope
from server.errors import (  # noqa: F401 - re-exported for the routers
    BadRequest,
    Conflict,
    EngineFailure,
    Overloaded,
    PromptTooLong,
    RateLimited,
    Unauthorized,
    UploadRejected,
)

log = logging.getLogger("loraswap.server")


def error_response(status: int, message: str, type_: str, code: str | None, param=None, headers=None) -> JSONResponse:
    return JSONResponse(envelope(message, type_, code, param), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{param}: {message}{more}" if param else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type the API can meet to the OpenAI envelope."""

    @app.exception_handler(LoraswapError)
    async def _loraswap_error(request: Request, exc: LoraswapError):
        if exc.status >= 500:
            log.error("%s %s failed: %r", request.method, request.url.path, exc)
        return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), type_, None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "server_error", "internal_error")

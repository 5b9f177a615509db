"""The one place that turns every exception into OpenAI's error envelope.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`. Core code
raises `LoraswapError`s (the server's in `server/errors.py`, the adapter library's, the chat
template's and the engine's), which carry their own status, code and param, so one handler
answers them all. Request-body validation errors become 400 in the same envelope instead of
FastAPI's 422 shape. A 500 means a bug and is logged with its traceback.

A message a client sees never holds a filesystem path or an exception's repr: unexpected errors
(and the engine's own 500s) answer a fixed sentence with the request id (`X-Request-Id`, set by
`server.edge`), and the log line with that id carries the detail.

The server's error classes are re-exported here so routers keep one import line for them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import LoraswapError, envelope
from server.engine.errors import EngineError
from server.errors import (  # noqa: F401 - re-exported for the routers
    BadRequest,
    Conflict,
    EngineFailure,
    Overloaded,
    PromptTooLong,
    RateLimited,
    RequestTimeout,
    RequestTooLarge,
    Unauthorized,
    UploadRejected,
)

log = logging.getLogger("loraswap.server")


def error_response(status: int, message: str, type_: str, code: str | None, param=None, headers=None) -> JSONResponse:
    return JSONResponse(envelope(message, type_, code, param), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "unknown"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    # `param` is the request field (`stop`), the message keeps the full location (`stop.3`).
    param = loc[0] if loc else None
    # pydantic names union members in the location ("stop.str"); keep the part a client wrote.
    where = ".".join(part for part in loc if part != "str" and not part.startswith(("list[", "function-")))
    message = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return (f"{where}: {message}{more}" if where else f"{message}{more}"), param


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception type the API can meet to the OpenAI envelope."""

    @app.exception_handler(LoraswapError)
    async def _loraswap_error(request: Request, exc: LoraswapError):
        if exc.status >= 500:
            rid = request_id(request)
            log.error("%s: %s %s failed: %r", rid, request.method, request.url.path, exc)
            if isinstance(exc, EngineError) and exc.status == 500:
                # the engine's message may name files or hold a repr; the log above has it
                message = f"the engine could not serve this request (request id {rid})"
                return error_response(500, message, exc.type, exc.code, exc.param, exc.headers or None)
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
        rid = request_id(request)
        log.exception("%s: unhandled error on %s %s", rid, request.method, request.url.path)
        # This handler runs outside `Edge`, so the request id header is added here.
        return error_response(
            500,
            f"internal server error (request id {rid})",
            "server_error",
            "internal_error",
            headers={"X-Request-Id": rid},
        )

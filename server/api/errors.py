"""Typed API errors and the one place that turns every exception into OpenAI's error envelope.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}`. Core code
raises typed exceptions (`ApiError` subclasses here, `TemplateError` from the chat template,
`AdapterError`s from the adapter library, which carry their own status and code, and
`EngineError`s); request-body
validation errors become 400 in the same envelope instead of FastAPI's 422 shape. A 500 means a
bug and is logged with its traceback.

A message a client sees never holds a filesystem path or an exception's repr: unexpected errors
answer a fixed sentence with the request id (`X-Request-Id`, set by `server.edge`), and the log
line with that id carries the detail.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.chat_template import TemplateError
from adapters.errors import AdapterError
from server.engine.errors import EngineError, EngineStopped
from server.engine.errors import PromptTooLong as EnginePromptTooLong

log = logging.getLogger("loraswap.server")


class ApiError(Exception):
    """An error with an HTTP status and OpenAI's `type` / `code` / `param`."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else type(self).code
        self.status = status if status is not None else type(self).status
        self.headers = headers or {}


class BadRequest(ApiError):
    status, code = 400, "invalid_request"


class PromptTooLong(ApiError):
    status, code = 400, "context_length_exceeded"


class Unauthorized(ApiError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Conflict(ApiError):
    status, code = 409, "conflict"


class RateLimited(ApiError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class Overloaded(ApiError):
    status, type, code = 503, "server_error", "server_overloaded"


class EngineFailure(ApiError):
    """The engine could not serve a request it accepted (e.g. an adapter failed to load)."""

    status, type, code = 500, "server_error", "engine_error"


class UploadRejected(ApiError):
    """An upload refused before validation (size, file names, form fields)."""

    status, code = 400, "invalid_upload"


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, code: str | None, param=None, headers=None):
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
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)

    @app.exception_handler(AdapterError)
    async def _adapter_error(request: Request, exc: AdapterError):
        return error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(TemplateError)
    async def _template_error(request: Request, exc: TemplateError):
        return error_response(400, str(exc), "invalid_request_error", "invalid_messages", "messages")

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        if isinstance(exc, EnginePromptTooLong):
            return error_response(400, str(exc), "invalid_request_error", "context_length_exceeded", "messages")
        if isinstance(exc, EngineStopped):
            return error_response(503, "the engine is not running", "server_error", "not_ready",
                                  headers={"Retry-After": "1"})
        rid = request_id(request)
        log.error("%s: engine refused a request: %r", rid, exc)
        return error_response(500, f"the engine could not serve this request (request id {rid})", "server_error",
                              "engine_error")

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
        return error_response(500, f"internal server error (request id {rid})", "server_error", "internal_error",
                              headers={"X-Request-Id": rid})

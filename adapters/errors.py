"""The one error family of loraswap, shaped for the OpenAI error envelope, and the adapter library's errors.

`LoraswapError` is the base of every error a client may see, raised by the server and the adapter
library alike: it carries what the HTTP layer needs to answer
`{"error": {"message", "type", "param", "code"}}` without inspecting the message: an HTTP
`status`, a short machine `code` (`pickle_file`, `shape_mismatch`, ...), the envelope `type`, an
optional `param` and response `headers` (e.g. `Retry-After`). It lives here, at the bottom of
`server -> adapters <- trainer`, so every package may raise it. Nothing here knows about FastAPI;
the server owns the one handler that maps these to responses.
"""

from __future__ import annotations


def envelope(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error body; the only place its shape is written."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class LoraswapError(Exception):
    """Base of every client-facing error. Subclasses set `status`, `type` and `code` as class
    attributes; an instance may override each.

    Args:
        message: a human sentence naming the problem (shown to the client as is).
        param: the request parameter at fault, when there is one (e.g. `model`).
        code: a short stable machine code, e.g. `rank_out_of_range`.
        status: the HTTP status the server answers with (>= 500 is logged as a server fault).
        headers: extra response headers.
    """

    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = "invalid_request"

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

    def envelope(self) -> dict:
        """The OpenAI error body for this error."""
        return envelope(self.message, self.type, self.code, self.param)


class AdapterError(LoraswapError):
    """Base of the adapter library's client-facing errors; `code` is required (positional)."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None):
        super().__init__(message, code=code, status=status, param=param)


class InvalidAdapter(AdapterError):
    """An uploaded adapter is refused.

    Status by kind: 415 forbidden file types (pickles, code, unknown files), 413 size caps,
    422 content that does not fit the base (shapes, ranks, modules, values, template),
    400 malformed input (bad JSON, malformed safetensors, missing files).
    """


class AdapterNotFound(AdapterError):
    """No adapter of that name in the caller's namespace.

    The message depends only on the name, so another tenant's adapter answers exactly like one
    that does not exist.
    """

    def __init__(self, name: str, param: str | None = "model"):
        super().__init__(
            f"The model '{name}' does not exist or you do not have access to it.",
            code="model_not_found",
            status=404,
            param=param,
        )
        self.name = name


class InvalidName(AdapterError):
    """A tenant or adapter name outside `[A-Za-z0-9._-]{1,64}` or starting with a dot."""

    def __init__(self, message: str, param: str | None = "name"):
        super().__init__(message, code="invalid_name", status=400, param=param)


class AdapterOutOfRange(InvalidAdapter):
    """An adapter's numbers are out of proportion to the base (422 `adapter_out_of_range`).

    The message names the module and the measured figure against its bound, e.g.
    `model.layers.0.self_attn.q_proj: ||scaling*B@A||/||W|| = 3.1e+04 exceeds 4`.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, "adapter_out_of_range", 422, param)


class QuotaExceeded(AdapterError):
    """A tenant's store quota would be exceeded (403 `quota_exceeded`).

    `param` is `adapters` (count of names) or `stored_bytes` (bytes kept for the tenant).
    """

    def __init__(self, message: str, param: str):
        super().__init__(message, code="quota_exceeded", status=403, param=param)

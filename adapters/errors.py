"""Typed exceptions of the adapter library, shaped for the OpenAI error envelope.

Every error carries what the HTTP layer needs to answer
`{"error": {"message", "type", "param", "code"}}` without inspecting the message: an HTTP
`status`, a short machine `code` (`pickle_file`, `shape_mismatch`, ...), the envelope `type` and
an optional `param`. Nothing here knows about FastAPI; the server owns the one handler that maps
these to responses.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base of the adapter library's client-facing errors.

    Args:
        message: a human sentence naming the problem (shown to the client as is).
        code: a short stable machine code, e.g. `rank_out_of_range`.
        status: the HTTP status the server answers with.
        param: the request parameter at fault, when there is one (e.g. `model`).
    """

    type = "invalid_request_error"

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.param = param

    def envelope(self) -> dict:
        """The OpenAI error body for this error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidAdapter(AdapterError):
    """An uploaded adapter is refused.

    Status by kind: 415 forbidden file types (pickles, code, unknown files), 413 size caps,
    422 content that does not fit the base (shapes, ranks, modules, values, template),
    400 malformed input (bad JSON, malformed safetensors, missing files).
    """

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None):
        super().__init__(message, code, status, param)


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

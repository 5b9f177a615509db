"""Typed exceptions raised by the engine, each carrying the status and code the server answers with.

They derive from `adapters.errors.LoraswapError` (the one error family), so the server's single
handler maps them without knowing the engine; the engine imports nothing of the server.
"""

from __future__ import annotations

from adapters.errors import LoraswapError


class EngineError(LoraswapError):
    """Base class of everything the engine raises on purpose (a 500 unless a subclass says more)."""

    status, type, code = 500, "server_error", "engine_error"


class PromptTooLong(EngineError, ValueError):
    """The prompt (plus the completion asked for) does not fit max_model_len or the KV cache.

    The one `PromptTooLong`: the engine raises it at submission and the server's length check
    raises it before admission.
    """

    status, type, code = 400, "invalid_request_error", "context_length_exceeded"

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param)


class DuplicateRequest(EngineError, ValueError):
    """A request id that is already running was submitted again."""


class AdapterLoadError(EngineError):
    """An adapter could not be read from disk or does not fit the engine (rank, modules)."""


class EngineStopped(EngineError, RuntimeError):
    """The engine loop is not running (never started, or stopped); clients see a 503 to retry."""

    status, type, code = 503, "server_error", "not_ready"

    def __init__(self, detail: str = ""):
        super().__init__("the engine is not running", headers={"Retry-After": "1"})
        self.detail = detail


class UnsupportedModel(EngineError, ValueError):
    """The base's architecture or an option of it is outside what the model file implements."""

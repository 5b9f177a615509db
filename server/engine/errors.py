"""Typed exceptions raised by the engine; the HTTP layer maps each to an OpenAI error envelope."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class PromptTooLong(EngineError, ValueError):
    """The prompt leaves no room for a completion within max_model_len."""


class DuplicateRequest(EngineError, ValueError):
    """A request id that is already running was submitted again."""


class AdapterLoadError(EngineError):
    """An adapter could not be read from disk or does not fit the engine (rank, modules)."""


class EngineStopped(EngineError, RuntimeError):
    """The engine loop is not running (never started, or stopped)."""


class UnsupportedModel(EngineError, ValueError):
    """The base's architecture or an option of it is outside what the model file implements."""

"""The commands callers send the engine loop: small frozen dataclasses, applied between steps.

Any thread may queue one (`EngineCore.send`); the loop applies them in order with one dispatch
(`EngineCore.apply`). To add a command: a dataclass here, a case in `apply`, a public method that
sends it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.engine.sequence import Sequence
from server.engine.types import AdapterRef, TokenEvent

Sink = Callable[[TokenEvent], object]  # receives a request's events, on the loop thread (result ignored)


@dataclass(frozen=True)
class AddRequest:
    seq: Sequence
    sink: Sink


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Pin:
    adapter: AdapterRef
    tenant: str = "default"


@dataclass(frozen=True)
class Unpin:
    adapter_id: str
    tenant: str = "default"


@dataclass(frozen=True)
class Forget:
    adapter_id: str
    tenant: str | None = None  # None: forgotten for everyone; a tenant: only its pin and view go


Command = AddRequest | Abort | Pin | Unpin | Forget

"""The `EngineClient` protocol, the real `Engine` and the tests' `FakeEngine` agree member by member.

A protocol nobody checks drifts: this fails as soon as a method is added, renamed or re-typed in
one of the three and not the others (names, parameter kinds, defaults, annotations, async-ness).
"""

from __future__ import annotations

import inspect

import pytest

from server.engine.engine import Engine
from server.engine.types import EngineClient, EngineStats
from tests.server.fake_engine import FakeEngine

METHODS = sorted(name for name, value in vars(EngineClient).items()
                 if callable(value) and not name.startswith("_"))
ATTRIBUTES = sorted(EngineClient.__annotations__)


def _shape(function) -> tuple:
    """Everything a caller relies on: async or not, parameters and their annotations, the result."""
    signature = inspect.signature(function)
    params = [(p.name, p.kind, p.default, str(p.annotation)) for p in list(signature.parameters.values())[1:]]
    return inspect.iscoroutinefunction(function), params, str(signature.return_annotation)


def test_the_protocol_names_the_members_the_server_uses():
    assert METHODS == ["abort", "add_request", "forget_adapter", "pin", "start", "stats", "stop", "tenant_residency",
                       "unpin"]
    assert ATTRIBUTES == ["max_model_len", "tokenizer"]


@pytest.mark.parametrize("implementation", [Engine, FakeEngine])
def test_implementations_declare_the_protocol_attributes(implementation):
    declared = implementation.__annotations__
    assert {name: declared.get(name) for name in ATTRIBUTES} == {name: EngineClient.__annotations__[name]
                                                                 for name in ATTRIBUTES}


@pytest.mark.parametrize("implementation", [Engine, FakeEngine])
@pytest.mark.parametrize("name", METHODS)
def test_implementations_match_the_protocol(implementation, name):
    assert _shape(getattr(implementation, name)) == _shape(getattr(EngineClient, name))


def test_the_fake_engine_is_an_engine_client(tiny_tokenizer):
    fake = FakeEngine(tiny_tokenizer)
    assert isinstance(fake, EngineClient)
    assert isinstance(fake.stats(), EngineStats)
    assert fake.max_model_len >= 1


def test_a_drifted_fake_fails_the_check():
    class Drifted(FakeEngine):
        def pin(self, adapter_id: str) -> None:  # takes an id where the protocol takes an AdapterRef
            pass

    assert _shape(Drifted.pin) != _shape(EngineClient.pin)

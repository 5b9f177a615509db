"""The `EngineClient` protocol, the real `Engine` and the tests' `FakeEngine` agree member by member.

A protocol nobody checks drifts: this fails as soon as a method is added, renamed or re-typed in
one of the three and not the others (names, parameter kinds, defaults, annotations, async-ness).
"""

from __future__ import annotations

import inspect

import pytest

from server.cluster.client import ReplicaEngineClient, as_stats, merge_stats
from server.engine.engine import Engine
from server.engine.types import EngineClient, EngineStats, FoldView
from tests.server.fake_engine import FakeEngine

METHODS = sorted(name for name, value in vars(EngineClient).items() if callable(value) and not name.startswith("_"))
ATTRIBUTES = sorted(EngineClient.__annotations__)


def _shape(function) -> tuple:
    """Everything a caller relies on: async or not, parameters and their annotations, the result."""
    signature = inspect.signature(function)
    params = [(p.name, p.kind, p.default, str(p.annotation)) for p in list(signature.parameters.values())[1:]]
    return inspect.iscoroutinefunction(function), params, str(signature.return_annotation)


def test_the_protocol_names_the_members_the_server_uses():
    assert METHODS == [
        "abort",
        "add_request",
        "forget_adapter",
        "pin",
        "start",
        "stats",
        "stop",
        "tenant_residency",
        "unpin",
    ]
    assert ATTRIBUTES == ["max_model_len", "tokenizer"]


@pytest.mark.parametrize("implementation", [Engine, FakeEngine, ReplicaEngineClient])
def test_implementations_declare_the_protocol_attributes(implementation):
    declared = implementation.__annotations__
    assert {name: declared.get(name) for name in ATTRIBUTES} == {
        name: EngineClient.__annotations__[name] for name in ATTRIBUTES
    }


@pytest.mark.parametrize("implementation", [Engine, FakeEngine, ReplicaEngineClient])
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


def test_the_replica_client_is_an_engine_client_with_typed_stats(tiny_tokenizer):
    client = ReplicaEngineClient(handle=None, tokenizer=tiny_tokenizer, max_model_len=64)
    assert isinstance(client, EngineClient)
    assert client.stats() == EngineStats()
    one = EngineStats(
        running=1,
        adapters={"a": "host", "b": "device"},
        slots={1: "b"},
        fold=FoldView(folded="b", pinned=("b",)),
        slot_loads=2,
    )
    two = as_stats(
        {
            "waiting": 3,
            "adapters": {"a": "device"},
            "slots": {1: None, 2: "a"},
            "fold": {"pinned": ["a"], "folds": 1},
            "slot_loads": 1,
        }
    )
    client._stats = {"r1": one, "r2": two}
    merged = client.stats()
    assert isinstance(merged, EngineStats)
    assert (merged.running, merged.waiting, merged.slot_loads) == (1, 3, 3)
    assert merged.adapters == {"a": "device", "b": "device"}
    assert merged.slots == {1: "b", 2: None, 3: "a"}
    assert merged.fold == FoldView(folded="b", pinned=("a", "b"), folds=1)
    assert merge_stats([]) == EngineStats()
    client._used["alice"].add("a")
    client._pins["a"].add("bob")
    assert {aid: (r.tier, r.pinned) for aid, r in client.tenant_residency("alice").items()} == {"a": ("device", False)}
    assert client.tenant_residency("bob") == {}

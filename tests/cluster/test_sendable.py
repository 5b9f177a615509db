"""What the ingress sends a replica with a request (no Ray needed): no compiled grammar, no paths."""

from __future__ import annotations

import pickle
from pathlib import Path

from server.cluster.client import mix_parts, sendable
from server.engine.grammar import CompiledGrammar, GrammarSpec
from server.engine.mixes import make_mix_ref
from server.engine.types import AdapterRef, SamplingParams


class Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle a matcher")  # as llguidance's LLMatcher


def test_a_compiled_grammar_travels_as_its_spec_and_end_ids():
    spec = GrammarSpec.json_schema({"type": "object"})
    sampling = SamplingParams(max_tokens=5, grammar=CompiledGrammar(spec, Unpicklable(), [7, 9]))
    sent, grammar = sendable(sampling)
    assert sent.grammar is None and sent.max_tokens == 5
    assert grammar == (spec, (7, 9))
    pickle.dumps((sent, grammar))  # what Ray does with the arguments
    plain = SamplingParams(max_tokens=3)
    assert sendable(plain) == (plain, None)


def test_a_mix_travels_as_its_parts_content_ids_and_weights():
    mix = make_mix_ref([(AdapterRef("b" * 16, Path("/store/b")), 0.3), (AdapterRef("a" * 16, Path("/store/a")), 0.7)])
    assert mix_parts(mix) == (("a" * 16, 0.7), ("b" * 16, 0.3))  # canonical order, no paths
    assert mix_parts(AdapterRef("a" * 16, Path("/store/a"))) == () and mix_parts(None) == ()

"""Reading an adapter for the slots: a stored one from its directory, a mix composed from its parts.

The one hook the slots need for per-request mixes: `read_weights(ref)` is what the loader thread
reads instead of `read_peft(ref.path)`, so a `MixRef` becomes an ordinary host adapter (the `cat`
composition of its parts, adapters/mix.py) and the slot, fold and step paths never know it is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from adapters.format import LoraWeights, read_peft
from adapters.mix import canonical_parts, compose_mix, mix_id
from server.engine.types import AdapterRef, MixRef


def make_mix_ref(parts: Sequence[tuple[AdapterRef, float]]) -> MixRef:
    """The engine's reference to the mix of `parts` ((adapter, weight) pairs, any order)."""
    by_id = {ref.id: ref for ref, _ in parts}
    ordered = canonical_parts([(ref.id, weight) for ref, weight in parts])
    return MixRef(
        id=mix_id(ordered),
        path=Path(),
        parts=tuple((by_id[content_id], weight) for content_id, weight in ordered),
    )


def read_weights(ref: AdapterRef) -> LoraWeights:
    """The adapter's weights: its PEFT directory, or for a mix the composition of its parts."""
    if isinstance(ref, MixRef):
        return compose_mix([(read_peft(part.path), weight) for part, weight in ref.parts])
    return read_peft(ref.path)

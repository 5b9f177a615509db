"""`ReplicaMixes`: what a replica remembers of the mixes it builds (no Ray needed)."""

from __future__ import annotations

import pytest

from adapters.mix import canonical_parts, mix_id
from server.cluster.mixes import ReplicaMixes, is_mix

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _mix(*parts):
    return mix_id(canonical_parts(parts))


def test_a_declared_mix_keeps_its_parts_and_a_part_forgets_its_mixes():
    mixes = ReplicaMixes()
    ab, bc = _mix((A, 0.5), (B, 0.5)), _mix((B, 1.0), (C, 0.2))
    assert is_mix(ab) and not is_mix(A)
    assert mixes.declare(ab, [(B, 0.5), (A, 0.5)]) == []  # any order: canonical parts
    mixes.declare(bc, [(B, 1.0), (C, 0.2)])
    assert mixes.parts(ab) == tuple(canonical_parts([(A, 0.5), (B, 0.5)]))
    assert sorted(mixes.built_from(B)) == sorted([ab, bc])
    assert mixes.parts(ab) is None and mixes.parts(bc) is None
    assert mixes.built_from(A) == []


@pytest.mark.parametrize(
    "parts",
    [[(A, 0.5)], [(A, 0.5), (B, 0.4)], [], [("mix:" + "d" * 64, 1.0)]],
    ids=["fewer parts", "other weight", "no parts", "a mix as a part"],
)
def test_parts_that_do_not_make_the_id_are_refused(parts):
    with pytest.raises(ValueError):
        ReplicaMixes().declare(_mix((A, 0.5), (B, 0.5)), parts)


def test_the_record_is_bounded_least_recently_used_first():
    mixes = ReplicaMixes(kept=2)
    ids = [_mix((A, w), (B, 1.0)) for w in (0.1, 0.2, 0.3)]
    assert mixes.declare(ids[0], [(A, 0.1), (B, 1.0)]) == []
    assert mixes.declare(ids[1], [(A, 0.2), (B, 1.0)]) == []
    mixes.declare(ids[0], [(A, 0.1), (B, 1.0)])  # used again: now the newest
    assert mixes.declare(ids[2], [(A, 0.3), (B, 1.0)]) == [ids[1]]

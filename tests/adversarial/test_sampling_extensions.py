"""Class: the fields added for parallel sampling, the prefix cache and adapter mixes (issue 13).

`n`, `cache_salt` and `adapters` (a weighted mix of the caller's adapters) are numbers and lists a
hostile tenant chooses. The contract: each is bounded at the edge with a 400 naming it (or a 404
for a mix naming another tenant's adapter, exactly as for a missing one), and a heavy but legal
use (the most choices, a mix at the weight bound) costs only the caller: bob's concurrent greedy
streams end with exactly their solo tokens either way.
"""

from __future__ import annotations

import pytest

from tests.adversarial.clients import Victims, assert_envelope, chat_body, plain_chat


def _victims(adv):
    return Victims(adv.url, adv.refs, [("bob", "bob-b"), ("bob", adv.base_id)])


def _mix(*parts):
    return [{"name": name, "weight": weight} for name, weight in parts]


@pytest.mark.parametrize(
    "case, extra, status, param",
    [
        ("n_huge", {"n": 10**9}, 400, "n"),
        ("n_zero", {"n": 0}, 400, "n"),
        ("salt_1mib", {"cache_salt": "s" * (1 << 20)}, 400, "cache_salt"),
        ("mix_too_many", {"adapters": _mix(*[("alice-a", 0.1)] * 1000)}, 400, "adapters"),
        ("mix_weight_huge", {"adapters": _mix(("alice-a", 1e300))}, 400, "adapters"),
        ("mix_other_tenant", {"adapters": _mix(("bob-b", 1.0))}, 404, "adapters"),
    ],
)
def test_new_fields_are_bounded(alive, case, extra, status, param):
    adv = alive
    model = adv.base_id if "adapters" in extra else "alice-a"
    with _victims(adv) as victims:
        result = plain_chat(adv.url, "alice", chat_body(model, 16, **extra))
    victims.check()
    assert_envelope(result, status, param=param)


def test_heavy_legal_use_costs_only_the_caller(alive):
    """The most choices the server allows, with a mix at the weight bound, while bob streams."""
    adv = alive
    body = chat_body(adv.base_id, 64, n=8, cache_salt="alice", adapters=_mix(("alice-a", 10.0), ("alice-b", -10.0)))
    with _victims(adv) as victims:
        result = plain_chat(adv.url, "alice", body)
    victims.check()
    # 200, or the mix's own refusal (a weight-10 mix may leave the upload bounds): never a 5xx
    assert result.status in (200, 400, 422), result.raw[-500:]

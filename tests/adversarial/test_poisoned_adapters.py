"""Class: hostile-but-valid-looking adapters are refused at upload, and never reach another row.

Today `lora_alpha: 1e300` and B values near float32 max are accepted (201), and a request on
them poisons bob's rows in a mixed step; zero-rank tensors answer 500, a 0-d `lora_A` drops the
connection, a `[2**64, 0]` shape reaches the library, and 70,000 `alpha_pattern` keys or a
240,000-tensor header cost seconds of CPU. The contract: numerics out of proportion to the base
are 422 `adapter_out_of_range` with a message naming the module; structural defects are a 4xx
(the code is left to the implementation, so any 4xx with the envelope and a message is accepted).

If the server accepts a numerically hostile adapter anyway, the test goes on to run a request
on it next to bob's streams, so the failure shows the victim's damage as well as the 201.
"""

from __future__ import annotations

import re

import pytest

from tests.adversarial.clients import (
    Victims,
    assert_clean,
    assert_envelope,
    chat_body,
    client,
    plain_chat,
    upload,
)
from tests.adversarial.hostile_adapters import HOSTILE, many_tensors

NUMERIC = {"huge_alpha", "near_float32_max"}


def _victims(adv):
    return Victims(adv.url, adv.refs, [("bob", "bob-a"), ("bob", adv.base_id)])


def _delete(adv, tenant, name):
    with client(adv.url, tenant) as http:
        http.delete(f"/v1/adapters/{name}")


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_adapter_is_refused_and_bob_is_untouched(alive, kind):
    adv = alive
    files = HOSTILE[kind](adv.base_info)
    name = f"hostile-{kind.replace('_', '-')}"
    with _victims(adv) as victims:
        response = upload(adv.url, "alice", name, files)
    victims.check()
    assert_clean(response.text)
    if response.status_code in (200, 201):
        try:
            if kind in NUMERIC:  # show the damage too; a structural one would only cost load time
                _run_accepted_hostile(adv, name)
        finally:
            _delete(adv, "alice", name)
        pytest.fail(
            f"{kind}: the hostile adapter was accepted ({response.status_code}); "
            f"its request and bob's concurrent streams survived, but it must be refused"
        )
    if kind in NUMERIC:
        error = assert_envelope(response, 422, "adapter_out_of_range")
        assert re.search(r"model\.layers\.\d+\.", error["message"]), "the message must name the module"
    else:
        assert_envelope(response, range(400, 500))


def _run_accepted_hostile(adv, name):
    """The hostile adapter was accepted: its own request may fail, bob's must not, even later."""
    with _victims(adv) as victims:
        own = plain_chat(adv.url, "alice", chat_body(name, max_tokens=16))
    victims.check()
    assert_clean(own.raw)
    if own.status != 200:
        assert_envelope(own, (422, 503), ("non_finite_output", "adapter_load_failed"))
    # After the hostile sequence freed its KV blocks, bob's base requests land on recycled blocks.
    with _victims(adv) as victims:
        pass
    victims.check()


def test_240000_tensor_header_is_refused(alive):
    adv = alive
    files = many_tensors()
    with _victims(adv) as victims:
        response = upload(adv.url, "alice", "hostile-many-tensors", files)
    victims.check()
    if response.status_code in (200, 201):
        _delete(adv, "alice", "hostile-many-tensors")
    assert_envelope(response, range(400, 500))


def _merge_alice_ab(adv, name, weights):
    """Alice's linear merge of her `alice-a` and `alice-b` at `weights`: the response."""
    parts = [{"name": part, "weight": weight} for part, weight in zip(("alice-a", "alice-b"), weights)]
    with client(adv.url, "alice") as http:
        return http.post("/v1/adapters/merge", json={"name": name, "method": "linear", "adapters": parts})


def test_merge_with_huge_weight_is_a_4xx(alive):
    """`weight: 1e300` multiplies deltas to inf: today a 500; the contract: 4xx (422 out of range)."""
    adv = alive
    with _victims(adv) as victims:
        response = _merge_alice_ab(adv, "merged-huge", (1e300, 1.0))
    victims.check()
    if response.status_code in (200, 201):
        _delete(adv, "alice", "merged-huge")
    assert_envelope(response, (400, 422), param=None)


def test_a_sane_merge_still_works(alive):
    """The bound must not refuse ordinary merges: two small adapters at weight 0.5 merge fine."""
    response = _merge_alice_ab(alive, "merged-sane", (0.5, 0.5))
    assert response.status_code in (200, 201), response.text
    _delete(alive, "alice", "merged-sane")

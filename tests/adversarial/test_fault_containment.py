"""Class: one request's sampling values must end only that request (issue 9, fault containment).

Today `temperature: 1e-300`, `seed: 2**64` and `top_k: 2**63` pass validation and raise inside
the engine step, which then fails every tenant's in-flight request. The contract: temperature
below 1e-5 is greedy (so 1e-300 answers 200 with the greedy tokens); seed and top_k out of their
64/32-bit ranges are a 400 naming the field. Either way bob's concurrent streams finish with
exactly their solo tokens.
"""

from __future__ import annotations

import pytest

from tests.adversarial.clients import (
    Victims,
    assert_clean,
    assert_envelope,
    assert_same_as_solo,
    chat_body,
    plain_chat,
    stream_chat,
)


def _victims(adv):
    return Victims(adv.url, adv.refs, [("bob", "bob-a"), ("bob", adv.base_id)])


def test_tiny_temperature_is_greedy_and_hurts_nobody(alive):
    adv = alive
    expected = adv.refs.get("alice", "alice-a")
    with _victims(adv) as victims:
        result = plain_chat(adv.url, "alice", chat_body("alice-a", temperature=1e-300))
    victims.check()
    assert result.status == 200, f"temperature 1e-300 must be served as greedy: {result.raw[:600]}"
    assert_same_as_solo(result, expected, "alice/alice-a at temperature 1e-300")


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 18446744073709551616),  # 2**64
        ("top_k", 9223372036854775808),  # 2**63
        ("seed", -(2**63) - 1),
        ("top_k", 2**31),
    ],
)
def test_out_of_range_sampling_is_a_400_for_that_request_only(alive, field, value):
    adv = alive
    with _victims(adv) as victims:
        plain = plain_chat(adv.url, "alice", chat_body("alice-a", 16, **{field: value}))
        streamed = stream_chat(adv.url, "alice", chat_body("alice-a", 16, **{field: value}))
    victims.check()
    assert_envelope(plain, 400, "invalid_request", field)
    assert_envelope(streamed, 400, "invalid_request", field)


def test_a_stream_that_fails_gets_its_own_error_event_then_done(alive):
    """Contract shape of an engine-side failure: `data: {"error": ...}` then `data: [DONE]`.

    A hostile value that slips past the edge must still end as this stream's own error event (or
    a 4xx before the stream starts), never as a broken connection or another tenant's failure.
    """
    adv = alive
    body = chat_body("alice-a", seed=2**63 - 1, top_k=2**31 - 1, temperature=1e-5 / 2, top_p=1e-300)
    with _victims(adv) as victims:
        result = stream_chat(adv.url, "alice", body)
    victims.check()
    assert_clean(result.raw)
    if result.status == 200:
        assert result.done, "the stream ended without [DONE]"
        if result.error is not None:
            assert set(result.error["error"]) >= {"message", "type", "param", "code"}
    else:
        assert_envelope(result, (400, 422))

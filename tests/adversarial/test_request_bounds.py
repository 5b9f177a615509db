"""Class: unbounded request fields (stop lists, message count and size) get a 400 at the edge.

Today 5,000 stop strings or a 1 MiB stop pass; an 8 MiB message stalls /health for seconds and
40,000 messages for 5 s (rendering runs on the event loop before admission). The contract:
`stop` at most 16 strings of 1..256 characters; `messages` at most `max_messages` entries and
`max_prompt_chars` characters in total, checked before rendering; a JSON body over
`max_request_bytes` (4 MiB) is a 413. bob's concurrent streams are untouched.
"""

from __future__ import annotations

import pytest

from tests.adversarial.clients import Victims, assert_envelope, chat_body, plain_chat


def _victims(adv):
    return Victims(adv.url, adv.refs, [("bob", "bob-b"), ("bob", adv.base_id)])


@pytest.mark.parametrize("case", ["5000_stops", "1mib_stop", "17_stops", "empty_stop"])
def test_stop_lists_are_bounded(alive, case):
    adv = alive
    stop = {
        "5000_stops": [f"s{i}" for i in range(5000)],
        "1mib_stop": "x" * (1 << 20),
        "17_stops": [f"s{i}" for i in range(17)],
        "empty_stop": [""],
    }[case]
    with _victims(adv) as victims:
        result = plain_chat(adv.url, "alice", chat_body("alice-a", 16, stop=stop))
    victims.check()
    assert_envelope(result, 400, "invalid_request", "stop")


@pytest.mark.parametrize(
    "messages",
    [
        # 40,001 valid turns, ending with the user: refused before rendering
        [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(40_001)],
        # 100,000 characters (under the 4 MiB body cap, over max_prompt_chars=65536)
        [{"role": "user", "content": "Paris " * 16_667}],
    ],
    ids=["forty thousand messages", "too many characters"],
)
def test_too_many_messages_or_characters_is_a_400(alive, messages):
    adv = alive
    with _victims(adv) as victims:
        result = plain_chat(adv.url, "alice", chat_body("alice-a", 16, messages=messages))
    victims.check()
    assert_envelope(result, 400, "invalid_request", "messages")


def test_an_8_mib_message_is_refused_by_size(alive):
    """Over the 4 MiB body cap: 413 request_too_large (a server with a larger cap: 400 messages)."""
    adv = alive
    messages = [{"role": "user", "content": "a" * (8 << 20)}]
    with _victims(adv) as victims:
        result = plain_chat(adv.url, "alice", chat_body("alice-a", 16, messages=messages))
    victims.check()
    error = assert_envelope(result, (413, 400), ("request_too_large", "invalid_request"))
    if result.status == 400:
        assert error["param"] == "messages"


@pytest.mark.parametrize(
    "field,value",
    [("n", 9), ("max_tokens", 10**9), ("top_logprobs", 21), ("temperature", 2.5), ("top_p", 0), ("min_tokens", 10**6)],
)
def test_other_fields_out_of_bounds_name_the_field(alive, field, value):
    adv = alive
    body = {**chat_body("alice-a", 8), field: value}
    result = plain_chat(adv.url, "alice", body)
    # max_tokens past max_model_len is refused today as context_length_exceeded: either code names it.
    codes = ("invalid_request", "context_length_exceeded")
    params = (field, "messages") if field == "max_tokens" else field
    assert_envelope(result, 400, codes, params)

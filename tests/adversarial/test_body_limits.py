"""Class: the body is a resource: auth and the size cap run before it is read, and reads time out.

Today auth runs after FastAPI has read and parsed the body, there is no size cap on JSON routes,
a chunked upload is only measured after it has all arrived, and a body that never finishes holds
its connection forever. The contract: a missing key is 401 and a declared Content-Length over
`max_request_bytes` is 413 `request_too_large`, both without reading the body; a chunked body is
refused (413) as soon as it passes the cap; a body slower than `body_read_timeout_s` (2 s here)
is 408 `request_timeout`. Each test sends only part of the body and waits for the answer: a
server that insists on reading all of it never answers, and the test fails.
"""

from __future__ import annotations

import json
import time

from tests.adversarial.clients import Victims, assert_clean
from tests.adversarial.rawhttp import RawRequest
from tests.adversarial.server_process import LIMITS_ENV, SERVE_FLAGS, TENANT_KEYS

ANSWER_WITHIN_S = 15  # a liveness bound for "answers at all", not a speed assertion
MAX_REQUEST_BYTES = int(LIMITS_ENV["LORASWAP_LIMITS__MAX_REQUEST_BYTES"])
MAX_UPLOAD_BYTES = int(SERVE_FLAGS["--max-upload-mb"]) << 20


def _victims(adv):
    return Victims(adv.url, adv.refs, [("bob", "bob-a"), ("carol", "carol-0")])


def _check_error(status, body, text, expected_status, code=None):
    assert status is not None, "the server never answered while the body was incomplete (it waits for it)"
    assert status == expected_status, f"expected {expected_status}, got {status}: {text[:400]}"
    assert isinstance(body, dict) and set(body.get("error") or {}) >= {"message", "type", "param", "code"}, text
    if code is not None:
        assert body["error"]["code"] == code, text[:400]
    assert_clean(text)


def _partial_json(adv, key: str | None, declared: int, path: str = "/v1/chat/completions"):
    headers = {"Content-Type": "application/json", "Content-Length": str(declared)}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = RawRequest(adv.url, "POST", path, headers)
    request.send(b'{"model": "' + b"x" * 1000)  # a small part of the declared body, then nothing
    return request


def test_keyless_oversized_body_gets_401_without_being_read(alive):
    adv = alive
    with _victims(adv) as victims:
        with _partial_json(adv, None, 5 << 20) as request:
            status, body, text = request.wait_answer(ANSWER_WITHIN_S)
    victims.check()
    _check_error(status, body, text, 401)


def test_keyless_small_body_on_upload_route_gets_401_without_being_read(alive):
    adv = alive
    with _partial_json(adv, None, 100_000, "/v1/adapters") as request:
        status, body, text = request.wait_answer(ANSWER_WITHIN_S)
    _check_error(status, body, text, 401)


def test_keyed_oversized_body_gets_413_without_being_read(alive):
    adv = alive
    with _victims(adv) as victims:
        with _partial_json(adv, TENANT_KEYS["alice"], MAX_REQUEST_BYTES + 1) as request:
            status, body, text = request.wait_answer(ANSWER_WITHIN_S)
    victims.check()
    _check_error(status, body, text, 413, "request_too_large")


def test_chunked_upload_is_refused_once_past_the_cap(alive):
    """A chunked multipart upload that never ends: 413 after the cap, not after the last byte."""
    adv = alive
    boundary = "advboundary"
    headers = {
        "Authorization": f"Bearer {TENANT_KEYS['alice']}",
        "Transfer-Encoding": "chunked",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    preamble = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nchunky\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
        f'filename="adapter_model.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    piece = b"\0" * (256 << 10)

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    with _victims(adv) as victims:
        with RawRequest(adv.url, "POST", "/v1/adapters", headers) as request:
            request.send(chunk(preamble))
            sent = len(preamble)
            while sent < MAX_UPLOAD_BYTES + (4 << 20) and request.send(chunk(piece)):
                sent += len(piece)
            # no terminating chunk: the body never ends
            status, body, text = request.wait_answer(ANSWER_WITHIN_S)
    victims.check()
    _check_error(status, body, text, 413)


def test_slowloris_body_times_out_with_408(alive):
    """Ten connections that send half a body and stall: each gets 408; bob's streams are untouched."""
    adv = alive
    with _victims(adv) as victims:
        requests = [_partial_json(adv, TENANT_KEYS["alice"], 2000) for _ in range(10)]
        try:
            deadline = time.monotonic() + ANSWER_WITHIN_S  # one wait for all ten, not ten in a row
            answers = [request.wait_answer(max(0.1, deadline - time.monotonic())) for request in requests]
        finally:
            for request in requests:
                request.close()
    victims.check()
    for status, body, text in answers:
        _check_error(status, body, text, 408, "request_timeout")


def test_malformed_json_is_a_400_envelope(alive):
    adv = alive
    payload = b'{"model": "alice-a", "messages": [}'
    headers = {
        "Authorization": f"Bearer {TENANT_KEYS['alice']}",
        "Content-Type": "application/json",
        "Content-Length": str(len(payload)),
    }
    with RawRequest(adv.url, "POST", "/v1/chat/completions", headers) as request:
        request.send(payload)
        status, body, text = request.wait_answer(ANSWER_WITHIN_S)
    assert status in (400, 422), text
    assert json.loads(text)["error"]["message"]
    assert_clean(text)

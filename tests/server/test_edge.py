"""The edge before the body (server/edge.py), over raw sockets where it matters: a keyless client
is refused without the server waiting for (let alone parsing) its body, oversized bodies are
refused from Content-Length at once or as soon as a chunked body passes the cap, slow bodies time
out, and every response carries an X-Request-Id. Each time, another tenant keeps working."""

from __future__ import annotations

import json
import socket

import pytest

from server.limits import Limits
from tests.server.conftest import KEYS

USER = [{"role": "user", "content": "hi"}]
# Only a guard against a hung test: every answer below must come without the body being sent.
GUARD_S = 30


def _head(
    port: int,
    path: str,
    *,
    key: str | None,
    length: int | None = None,
    chunked: bool = False,
    content_type: str = "application/json",
) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read one HTTP response (headers + Content-Length body) from `sock`."""
    sock.settimeout(GUARD_S)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(status_line.split()[1]), headers, json.loads(rest[:length])


def _exchange(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], dict]:
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
        sock.sendall(head + body)
        return _read_response(sock)


def _bob_still_served(server) -> None:
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 2}
    response = server.client("bob").post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"].startswith("req-")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/adapters", "/tokenize", "/v1/adapters/merge"])
def test_keyless_client_with_a_huge_declared_body_gets_401_without_sending_it(fake_server, path):
    status, headers, body = _exchange(
        fake_server.live.port, _head(fake_server.live.port, path, key=None, length=10**12)
    )
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert headers["x-request-id"].startswith("req-")
    status, _, body = _exchange(
        fake_server.live.port, _head(fake_server.live.port, path, key="sk-wrong", length=10**12)
    )
    assert status == 401 and body["error"]["message"] == "incorrect API key provided"
    _bob_still_served(fake_server)


def test_declared_oversize_json_body_is_413_before_it_is_sent(make_fake_server):
    server = make_fake_server(limits=Limits(max_request_bytes=4096))
    port = server.live.port
    status, _, body = _exchange(port, _head(port, "/v1/chat/completions", key=KEYS["alice"], length=10**12))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "4096" in body["error"]["message"]
    _bob_still_served(server)


def test_declared_oversize_upload_is_413_before_it_is_sent(make_fake_server):
    server = make_fake_server(max_upload_bytes=1 << 20)
    port = server.live.port
    head = _head(port, "/v1/adapters", key=KEYS["alice"], length=10**12, content_type="multipart/form-data; boundary=x")
    status, _, body = _exchange(port, head)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    _bob_still_served(server)


def test_chunked_json_body_is_413_as_soon_as_it_passes_the_cap(make_fake_server):
    server = make_fake_server(limits=Limits(max_request_bytes=4096))
    port = server.live.port
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
        sock.sendall(_head(port, "/v1/chat/completions", key=KEYS["alice"], chunked=True))
        chunk = b"x" * 5000
        sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")  # no terminating chunk: still open
        status, _, body = _read_response(sock)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    _bob_still_served(server)


def test_chunked_upload_cannot_bypass_the_upload_cap(make_fake_server):
    server = make_fake_server(max_upload_bytes=64 * 1024)
    port = server.live.port
    head = _head(port, "/v1/adapters", key=KEYS["alice"], chunked=True, content_type="multipart/form-data; boundary=x")
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
        sock.sendall(head)
        part = (
            b'--x\r\nContent-Disposition: form-data; name="files"; filename="adapter_model.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 16384
        )
        sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        for _ in range(5):  # 80 KiB more, never finishing the form
            filler = b"\0" * 16384
            sock.sendall(f"{len(filler):x}\r\n".encode() + filler + b"\r\n")
        status, _, body = _read_response(sock)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "adapter upload" in body["error"]["message"]
    assert server.store.list("alice") == []
    _bob_still_served(server)


def test_slowloris_body_gets_408(make_fake_server):
    server = make_fake_server(limits=Limits(body_read_timeout_s=0.5))
    port = server.live.port
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
        sock.sendall(_head(port, "/v1/chat/completions", key=KEYS["alice"], length=100) + b'{"model": ')
        status, _, body = _read_response(sock)  # the other 90 bytes never come
    assert status == 408 and body["error"]["code"] == "request_timeout"
    _bob_still_served(server)


def test_slow_chunked_upload_gets_408(make_fake_server):
    server = make_fake_server(limits=Limits(upload_read_timeout_s=0.5))
    port = server.live.port
    head = _head(port, "/v1/adapters", key=KEYS["alice"], chunked=True, content_type="multipart/form-data; boundary=x")
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD_S) as sock:
        sock.sendall(head + b"3\r\n--x\r\n")
        status, _, body = _read_response(sock)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    _bob_still_served(server)


def test_metrics_need_the_admin_key(fake_server):
    assert fake_server.client(tenant=None).get("/metrics").status_code == 401
    for tenant in KEYS:
        response = fake_server.client(tenant).get("/metrics")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    admin = fake_server.client("admin").get("/metrics")
    assert admin.status_code == 200 and "loraswap_engine_running" in admin.text
    # The admin key is not a tenant's key: it reaches no tenant's namespace.
    assert fake_server.client("admin").get("/v1/models").status_code == 401


def test_metrics_without_an_admin_key_configured_are_closed_when_tenants_exist(make_fake_server):
    server = make_fake_server(admin_key=None)
    assert server.client("alice").get("/metrics").status_code == 401


def test_public_probes_need_no_key_and_every_answer_has_a_request_id(fake_server):
    anonymous = fake_server.client(tenant=None)
    ids = set()
    for path in ("/health", "/ready"):
        response = anonymous.get(path)
        assert response.status_code == 200
        ids.add(response.headers["x-request-id"])
    missing = fake_server.client().post("/v1/chat/completions", json={"model": "nope", "messages": USER})
    assert missing.status_code == 404
    ids.add(missing.headers["x-request-id"])
    assert len(ids) == 3  # one id per request

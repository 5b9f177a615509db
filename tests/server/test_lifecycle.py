"""Lifecycle: client disconnects abort the engine request; SIGTERM drains requests in flight.

The SIGTERM test runs the real `loraswap serve` (tiny base, fp32) in a subprocess: a stream that
is in flight when the signal arrives still completes to `[DONE]`, new requests are refused, and
the process shuts the app down cleanly and exits.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server.conftest import KEYS
from tests.server.live import wait_until

ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "hello"}]


def test_non_streaming_client_disconnect_aborts_the_engine_request(fake_server):
    fake_server.engine.gate.clear()  # no step runs: the request stays in flight until we leave
    body = json.dumps({"model": fake_server.state.base_id, "messages": USER, "max_tokens": 50}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEYS['alice']}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", fake_server.live.port)) as sock:
        sock.sendall(request)
        assert wait_until(lambda: len(fake_server.engine.running) == 1)
        (request_id,) = fake_server.engine.running
    assert wait_until(lambda: fake_server.engine.aborted == [request_id])
    assert wait_until(lambda: fake_server.state.admission.total == 0)
    assert not fake_server.engine.running and not fake_server.state.inflight.counts


def test_streaming_client_disconnect_aborts_the_engine_request(fake_server, peft_adapters):
    from tests.server.conftest import upload

    http = fake_server.client()
    upload(http, "held", peft_adapters["a"])
    fake_server.engine.gate.clear()
    body = {"model": "held", "messages": USER, "max_tokens": 50, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert wait_until(lambda: len(fake_server.engine.running) == 1)
        (request_id,) = fake_server.engine.running
    assert wait_until(lambda: fake_server.engine.aborted == [request_id])
    assert wait_until(lambda: fake_server.state.admission.total == 0 and not fake_server.state.inflight.counts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_drains_requests_in_flight_then_exits(tiny_base_dir, tmp_path):
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "loraswap.cli",
        "serve",
        "--base",
        str(tiny_base_dir),
        "--port",
        str(port),
        "--quant",
        "none",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--fold",
        "off",
        "--kv-cache-mb",
        "16",
        "--store",
        str(tmp_path / "store"),
        "--max-model-len",
        "512",
        "--drain-timeout-s",
        "60",
    ]
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, (tmp_path / "server.log").read_text()
                return False

        assert wait_until(ready, timeout=180, interval=0.2), (tmp_path / "server.log").read_text()
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

        body = {"model": base, "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=120) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                in_flight = wait_until(lambda: "loraswap_engine_running 1.0" in httpx.get(f"{url}/metrics").text)
                process.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                try:
                    refused = httpx.post(
                        f"{url}/v1/chat/completions", timeout=5, json={"model": base, "messages": USER, "max_tokens": 1}
                    ).status_code
                except httpx.TransportError:
                    refused = "connection refused"
                rest = [line for line in lines if line]
        assert in_flight  # the stream was running in the engine when SIGTERM arrived
        assert refused in (503, "connection refused")
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal after a clean shutdown, so the exit reads "killed by SIGTERM"
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in (tmp_path / "server.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

"""Hand-written HTTP/1.1 over a socket, for attacks an HTTP client library will not make.

`RawRequest` sends headers and as much body as the test wants (or trickles it, or sends chunks
past a cap) while a reader thread collects whatever the server answers, so a server that
responds early and closes is seen even if the send side hits a reset.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse


class RawRequest:
    def __init__(self, url: str, method: str, path: str, headers: dict[str, str]):
        parsed = urlparse(url)
        self.sock = socket.create_connection((parsed.hostname, parsed.port), timeout=10)
        self.received = bytearray()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {parsed.hostname}:{parsed.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._reader.start()

    def _read(self):
        self.sock.settimeout(1.0)
        try:
            while not self._closed.is_set():
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    break
                self.received += data
        except OSError:
            pass
        finally:
            self._closed.set()

    def send(self, data: bytes) -> bool:
        """Send `data`; False once the server has answered or closed (stop sending then)."""
        if self.answered() or self._closed.is_set():
            return False
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def answered(self) -> bool:
        return b"\r\n\r\n" in self.received

    def wait_answer(self, timeout: float) -> tuple[int | None, dict | None, str]:
        """(status, JSON body or None, raw text) once a full response arrived, or (None, None, "")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body, text = self._parse()
            if status is not None and (body is not None or self._closed.is_set()):
                return status, body, text
            if self._closed.is_set() and not self.received:
                return None, None, ""
            time.sleep(0.05)
        return self._parse()

    def _parse(self):
        raw = bytes(self.received)
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            return None, None, ""
        status = int(head.split(b" ", 2)[1])
        text = rest.decode(errors="replace")
        if b"transfer-encoding: chunked" in head.lower():
            text = _dechunk(rest).decode(errors="replace")
        try:
            return status, json.loads(text), text
        except ValueError:
            return status, None, text

    def close(self):
        self._closed.set()
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _dechunk(data: bytes) -> bytes:
    out, rest = bytearray(), data
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return bytes(out)

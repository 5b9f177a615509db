"""A real `loraswap serve` process on a free loopback port, for the adversarial suite and the soak.

The suite attacks the server the way a hostile tenant would: over real sockets, against the
process a deployment runs (`python -m loraswap.cli serve`), so body caps before the body,
slowloris timeouts, chunked uploads and a restart over the same store behave as in production.
Settings the issue-9 contract adds (`max_request_bytes`, quotas, the admin key...) are passed as
`LORASWAP_*` environment variables: a server without them ignores them (extra="ignore"), which
is what lets this suite run, and fail, on code that predates the contract.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]

TENANT_KEYS = {"alice": "sk-alice-adv-0123456789", "bob": "sk-bob-adv-9876543210", "carol": "sk-carol-adv-5555555555"}
ADMIN_KEY = "sk-admin-adv-4242424242"

# Small limits so the suite is fast; the contract's knobs, as environment variables of the `limits`
# group (LORASWAP_LIMITS__<KNOB>, see server/limits.py).
LIMITS_ENV = {
    "LORASWAP_LIMITS__MAX_REQUEST_BYTES": str(4 * 1024 * 1024),
    "LORASWAP_LIMITS__BODY_READ_TIMEOUT_S": "2",
    "LORASWAP_LIMITS__MAX_MESSAGES": "512",
    "LORASWAP_LIMITS__MAX_PROMPT_CHARS": "65536",
    "LORASWAP_LIMITS__MAX_ADAPTERS_PER_TENANT": "12",
    "LORASWAP_LIMITS__MAX_STORED_BYTES_PER_TENANT": str(2 * 1024 * 1024),
    "LORASWAP_LIMITS__MAX_VERSIONS_KEPT": "2",
}
SERVE_FLAGS = {
    "--quant": "none",
    "--dtype": "float32",
    "--device": "cpu",
    "--fold": "off",
    "--max-model-len": "512",
    "--max-loras": "4",
    "--max-cpu-loras": "8",
    "--max-num-seqs": "8",
    "--kv-cache-mb": "16",
    "--max-upload-mb": "16",
    "--max-concurrent-per-tenant": "8",
    "--max-queue": "32",
    "--drain-timeout-s": "2",
}


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`loraswap serve` in a child process; `start()`, `stop()`, `restart()` over the same store."""

    def __init__(
        self, base_dir: Path, store: Path, log_path: Path, *, env: dict | None = None, flags: dict | None = None
    ):
        self.base_dir, self.store, self.log_path = Path(base_dir), Path(store), Path(log_path)
        self.env = {**LIMITS_ENV, **(env or {})}
        self.flags = {**SERVE_FLAGS, **(flags or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "loraswap.cli",
            "serve",
            "--base",
            str(self.base_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--store",
            str(self.store),
        ]
        for flag, value in self.flags.items():
            argv += [flag, value]
        return argv

    def start(self, timeout: float = 180) -> "ServerProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
        env.update(self.env)
        env["LORASWAP_API_KEYS"] = ",".join(f"{t}:{k}" for t, k in TENANT_KEYS.items())
        env["LORASWAP_ADMIN_KEY"] = ADMIN_KEY
        env["HF_HUB_OFFLINE"] = "1"  # nothing may download at run time
        env.setdefault("OMP_NUM_THREADS", "1")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=30).status_code == 200
        except httpx.HTTPError:
            return False

    def rss_bytes(self) -> int:
        """The server's resident set size, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

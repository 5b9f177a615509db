"""A real `loraswap serve` child process for the HTTP benchmarks: start, wait ready, stop.

The benchmark measures the process a deployment runs (`python -m loraswap.cli serve`), so the
event loop, the engine thread and the load generator compete for the same cores as they would in
production. Auth is off (one tenant, `default`); the caller passes every other flag. The child
gets SIGTERM if the benchmark dies, so no server outlives it.
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

REPO = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark process dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`loraswap serve --base <base> --store <store> <flags>` on a free loopback port.

    Args:
        base_dir: the base model directory.
        store: the adapter store directory (fresh per benchmark run).
        log_path: the child's stdout and stderr.
        flags: extra `serve` flags, e.g. {"--quant": "nf4"}.
        python: the interpreter's argv prefix (a profiler wrapper may replace `-m loraswap.cli`).
        cwd: the source tree to run (`-m` imports from it first); default this repository, another
            checkout compares two versions of the code side by side.
    """

    def __init__(
        self,
        base_dir: Path,
        store: Path,
        log_path: Path,
        flags: dict[str, str],
        python: list[str] | None = None,
        cwd: Path | None = None,
    ):
        self.base_dir, self.store, self.log_path = Path(base_dir), Path(store), Path(log_path)
        self.flags = flags
        self.python = python or [sys.executable, "-m", "loraswap.cli"]
        self.cwd = Path(cwd) if cwd is not None else REPO
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> list[str]:
        argv = [*self.python, "serve", "--base", str(self.base_dir), "--store", str(self.store)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        for flag, value in self.flags.items():
            argv += [flag, value]
        return argv

    def start(self, timeout: float = 300) -> ServeProcess:
        # The server reads LORASWAP_* as settings: only the flags given here may configure it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_") or k == "LORASWAP_CACHE"}
        env["HF_HUB_OFFLINE"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraswap serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"loraswap serve was not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (graceful: a profiler wrapper writes its file), then SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

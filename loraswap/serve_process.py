"""A real `loraswap serve` child process on a free loopback port: start, wait ready, stop.

The benchmarks (bench/) and the adversarial suite (tests/adversarial/) both measure or attack the
process a deployment runs (`python -m loraswap.cli serve`), so the event loop, the engine thread and
the client compete for the same cores, and body caps, timeouts and restarts behave as in
production. It lives here because both may import `loraswap` (bench/ must not import tests/).
The child reads no `LORASWAP_*` variable of the caller's (only `LORASWAP_CACHE`, where the default
base lives): its settings are the flags and `env` given here. It gets SIGTERM if the caller dies,
so no server outlives it; `stop` ends its whole process group (a Ray-served child's too).
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
    """In the child: SIGTERM when the parent process dies, even by SIGKILL (Linux prctl)."""
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
    """`loraswap serve [--base <base>] --store <store> <flags>` on a free loopback port.

    Args:
        base_dir: the base model directory (None: the default base).
        store: the adapter store directory.
        log_path: the child's stdout and stderr (appended).
        flags: extra `serve` flags, e.g. {"--quant": "nf4"}, or as argv (["--replicas", "2"]).
        python: the interpreter's argv prefix (a profiler wrapper may replace `-m loraswap.cli`).
        cwd: the source tree to run (`-m` imports from it first); default this repository, another
            checkout compares two versions of the code side by side.
        env: `LORASWAP_*` settings and other variables for the child.
        ready_timeout, stop_timeout: seconds to wait for `/ready`, and for a graceful exit.
    """

    def __init__(
        self,
        base_dir: Path | None,
        store: Path,
        log_path: Path,
        flags: dict[str, str] | list[str] | None = None,
        python: list[str] | None = None,
        cwd: Path | None = None,
        *,
        env: dict[str, str] | None = None,
        ready_timeout: float = 300,
        stop_timeout: float = 60,
    ):
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.store, self.log_path = Path(store), Path(log_path)
        self.flags = flags if isinstance(flags, list) else dict(flags or {})
        self.env = dict(env or {})
        self.python = python or [sys.executable, "-m", "loraswap.cli"]
        self.cwd = Path(cwd) if cwd is not None else REPO
        self.ready_timeout, self.stop_timeout = ready_timeout, stop_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def command(self) -> list[str]:
        argv = [*self.python, "serve"]
        if self.base_dir is not None:
            argv += ["--base", str(self.base_dir)]
        argv += ["--store", str(self.store), "--host", "127.0.0.1", "--port", str(self.port)]
        if isinstance(self.flags, list):
            return argv + self.flags
        for flag, value in self.flags.items():
            argv += [flag, value]
        return argv

    def child_env(self) -> dict[str, str]:
        # The server reads LORASWAP_* as settings: only what is given here may configure it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_") or k == "LORASWAP_CACHE"}
        env.update(self.env)
        env["HF_HUB_OFFLINE"] = "1"  # nothing may download at run time
        return env

    def start(self, timeout: float | None = None) -> ServeProcess:
        """`launch`, then `wait_ready`."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the child without waiting (several servers may start side by side)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.child_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float | None = None) -> ServeProcess:
        """Until `/ready` answers 200; RuntimeError with the log's tail if it exits or times out."""
        assert self.proc is not None, "not launched"
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
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
        raise RuntimeError(f"loraswap serve was not ready in time:\n{self.log_tail()}")

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (graceful: the server drains, a profiler wrapper writes its file), then SIGKILL
        to the process group if it hangs; whatever of the group is left after that goes too."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            self.proc.wait(timeout=30)
        self._kill_group()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # start_new_session: the group is the child's own
        except (ProcessLookupError, PermissionError):
            pass

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

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

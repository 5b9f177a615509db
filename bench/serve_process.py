"""A real `loraswap serve` child process for the HTTP benchmarks: `loraswap/serve_process.py`.

The one implementation is shared with the adversarial suite (bench/ must not import tests/, so it
lives in the `loraswap` package); auth is off (one tenant, `default`) unless the flags set keys.
"""

from __future__ import annotations

from loraswap.serve_process import REPO, ServeProcess, free_port

__all__ = ["REPO", "ServeProcess", "free_port"]

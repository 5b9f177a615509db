"""A real `loraswap serve` process on a free loopback port, for the adversarial suite and the soak.

The process handling is loraswap/serve_process.py (shared with the benchmarks); this module holds
the suite's tenants, admin key, flags and limits.

The suite attacks the server the way a hostile tenant would: over real sockets, against the
process a deployment runs (`python -m loraswap.cli serve`), so body caps before the body,
slowloris timeouts, chunked uploads and a restart over the same store behave as in production.
Settings the issue-9 contract adds (`max_request_bytes`, quotas, the admin key...) are passed as
`LORASWAP_*` environment variables: a server without them ignores them (extra="ignore"), which
is what lets this suite run, and fail, on code that predates the contract.
"""

from __future__ import annotations

import os
from pathlib import Path

from loraswap.serve_process import ServeProcess

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


class ServerProcess(ServeProcess):
    """`loraswap serve` with the suite's tenants, admin key, flags and limits
    (loraswap/serve_process.py); `start()`, `stop()`, `restart()` over the same store."""

    def __init__(
        self, base_dir: Path, store: Path, log_path: Path, *, env: dict | None = None, flags: dict | None = None
    ):
        env = {
            **LIMITS_ENV,
            **(env or {}),
            "LORASWAP_API_KEYS": ",".join(f"{t}:{k}" for t, k in TENANT_KEYS.items()),
            "LORASWAP_ADMIN_KEY": ADMIN_KEY,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        super().__init__(
            base_dir, store, log_path, {**SERVE_FLAGS, **(flags or {})}, env=env, ready_timeout=180, stop_timeout=30
        )

"""`Limits`: every bound the HTTP edge enforces, with its default, in one frozen dataclass.

These are the knobs of the tenant-isolation work (issue 9) on the HTTP side: body sizes and read
deadlines, structural bounds on chat requests checked before any rendering, worker pools that keep
rendering, uploads and merges off the event loop and apart from each other, and each tenant's
share of the admission queue. `ServerConfig.limits` holds one of these; the README's "Security
and isolation" table lists each with its flag and environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# The contract's fixed bounds on request fields (not configurable: they describe the wire format).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 2**31 - 1
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
GREEDY_BELOW = 1e-5  # vLLM's rule: a temperature this small means greedy, never a division by it


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may cost the server. Build one in a test with `Limits(...)`.

    Args:
        max_request_bytes: largest JSON request body (413 beyond, before it is read).
        body_read_timeout_s: a JSON body must arrive within this many seconds (408 beyond).
        upload_read_timeout_s: the same deadline for an adapter upload's body.
        max_messages: most chat messages in one request (400 `messages`).
        max_prompt_chars: most characters of message content in one request (400 `messages`).
        render_threads: threads that render and tokenize prompts off the event loop.
        max_concurrent_uploads: uploads read and validated at once, all tenants (503 beyond).
        max_concurrent_uploads_per_tenant: uploads at once per tenant (429 beyond).
        max_concurrent_merges: merges computed at once in their own pool (503 beyond).
        tenant_queue_share: the fraction of the admission capacity (running + queued) one tenant
            may hold, so one tenant never fills the global queue (429 beyond).
        gc_interval_s: how often unreferenced blobs are collected besides after each request.
        max_adapters_per_tenant: adapter names one tenant may hold (403 `quota_exceeded`).
        max_stored_bytes_per_tenant: bytes of adapters one tenant may hold (403 `quota_exceeded`).
        max_versions_kept: versions kept per name; older ones are pruned at publish.
    """

    max_request_bytes: int = 4 * 1024 * 1024
    body_read_timeout_s: float = 30.0
    upload_read_timeout_s: float = 300.0
    max_messages: int = 512
    max_prompt_chars: int = 262144
    render_threads: int = 4
    max_concurrent_uploads: int = 4
    max_concurrent_uploads_per_tenant: int = 2
    max_concurrent_merges: int = 2
    tenant_queue_share: float = 0.5
    gc_interval_s: float = 60.0
    # Store quotas: enforced by the store (adapters/store.py), configured here with the rest.
    max_adapters_per_tenant: int = 64
    max_stored_bytes_per_tenant: int = 4 * 1024**3
    max_versions_kept: int = 3

    def store_quotas(self) -> dict[str, int]:
        return {"max_adapters_per_tenant": self.max_adapters_per_tenant,
                "max_stored_bytes_per_tenant": self.max_stored_bytes_per_tenant,
                "max_versions_kept": self.max_versions_kept}

    def __post_init__(self):
        for item in fields(self):
            value = getattr(self, item.name)
            if not value > 0:
                raise ValueError(f"{item.name} must be > 0, got {value}")
        if self.tenant_queue_share > 1:
            raise ValueError(f"tenant_queue_share must be in (0, 1], got {self.tenant_queue_share}")
        if self.max_concurrent_uploads_per_tenant > self.max_concurrent_uploads:
            raise ValueError("max_concurrent_uploads_per_tenant must be <= max_concurrent_uploads")

    def tenant_capacity(self, capacity: int) -> int:
        """Requests one tenant may hold of `capacity` (at least 1)."""
        return max(1, int(capacity * self.tenant_queue_share))

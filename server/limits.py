"""`Limits`: every bound the HTTP edge enforces, with its default, in one frozen pydantic model.

These are the knobs of the tenant-isolation work (issue 9) on the HTTP side: body sizes and read
deadlines, structural bounds on chat requests checked before any rendering, worker pools that keep
rendering, uploads and merges off the event loop and apart from each other, and each tenant's
share of the admission queue. `ServerConfig.limits` holds one of these (flags `--limits.<knob>`,
environment `LORASWAP_LIMITS__<KNOB>`); the README's "Security and isolation" table lists each
with its flag and environment variable.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The contract's fixed bounds on request fields (not configurable: they describe the wire format).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 2**31 - 1
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
GREEDY_BELOW = 1e-5  # vLLM's rule: a temperature this small means greedy, never a division by it
# A request's `adapters` mix on the wire; `Limits.max_mix_adapters` is the (smaller) served bound.
MAX_MIX_COMPONENTS = 64
MAX_MIX_NAME_CHARS = 64  # an adapter name's bound (adapters/store.py `check_name`)
MAX_CACHE_SALT_CHARS = 256  # `cache_salt` (vLLM's prefix-cache isolation field); the engine checks it too


class Limits(BaseModel):
    """Bounds on what one request may cost the server. Build one in a test with `Limits(...)`.

    One group field of `ServerConfig` (`config.limits`): each knob is the flag `--limits.<knob>`
    and the environment variable `LORASWAP_LIMITS__<KNOB>`; its description is the help text.
    Every knob must be > 0; an invalid value raises a ValueError naming it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_request_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="largest JSON request body in bytes (413 beyond, before it is read)"
    )
    body_read_timeout_s: float = Field(30.0, gt=0, description="seconds a JSON body may take to arrive (408 beyond)")
    upload_read_timeout_s: float = Field(
        300.0, gt=0, description="seconds an adapter upload's body may take to arrive (408 beyond)"
    )
    max_messages: int = Field(512, gt=0, description="most messages in one chat request (400 'messages')")
    max_prompt_chars: int = Field(
        262144, gt=0, description="most characters of message content in one request (400 'messages')"
    )
    render_threads: int = Field(4, gt=0, description="threads that render and tokenize prompts off the event loop")
    max_concurrent_uploads: int = Field(
        4, gt=0, description="uploads read and validated at once, all tenants (503 beyond)"
    )
    max_concurrent_uploads_per_tenant: int = Field(2, gt=0, description="uploads at once per tenant (429 beyond)")
    max_concurrent_merges: int = Field(2, gt=0, description="merges computed at once in their own pool (503 beyond)")
    tenant_queue_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of the admission capacity (running + queued) one tenant may hold (429 beyond)",
    )
    max_mix_adapters: int = Field(4, gt=0, description="most adapters in one request's 'adapters' mix (400 'adapters')")
    max_mix_weight: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="largest |weight| of an adapter in a mix (400 'adapters')"
    )
    gc_interval_s: float = Field(60.0, gt=0, description="seconds between collections of unreferenced adapter blobs")
    # Store quotas: enforced by the store (adapters/store.py), configured here with the rest.
    max_adapters_per_tenant: int = Field(
        64, gt=0, description="adapter names one tenant may store (403 quota_exceeded)"
    )
    max_stored_bytes_per_tenant: int = Field(
        4 * 1024**3, gt=0, description="bytes of adapters one tenant may store (403 quota_exceeded)"
    )
    max_versions_kept: int = Field(
        3, gt=0, description="versions kept per adapter name; older ones are pruned at publish"
    )
    max_n: int = Field(
        8, gt=0, description="most choices (n) one chat request may ask for (400 'n'); each holds an admission slot"
    )

    @model_validator(mode="after")
    def _uploads_per_tenant_within_all(self) -> Limits:
        if self.max_concurrent_uploads_per_tenant > self.max_concurrent_uploads:
            raise ValueError("max_concurrent_uploads_per_tenant must be <= max_concurrent_uploads")
        return self

    def store_quotas(self) -> dict[str, int]:
        return {
            "max_adapters_per_tenant": self.max_adapters_per_tenant,
            "max_stored_bytes_per_tenant": self.max_stored_bytes_per_tenant,
            "max_versions_kept": self.max_versions_kept,
        }

    def tenant_capacity(self, capacity: int) -> int:
        """Requests one tenant may hold of `capacity` (at least 1)."""
        return max(1, int(capacity * self.tenant_queue_share))

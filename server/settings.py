"""Server settings: pydantic-settings at the edge (flags, `LORASWAP_*` environment) -> frozen config.

`ServerSettings` reads the environment (prefix `LORASWAP_`) and keyword overrides (the CLI's
flags); `ServerSettings.to_config()` turns it into `ServerConfig`, the frozen dataclass the rest
of the server reads. API keys come from `LORASWAP_API_KEYS="tenant:key,tenant:key"` and/or an
`--api-keys-file` with one `tenant:key` per line (`#` comments allowed). With no keys, auth is
off and every request belongs to tenant `default`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.config import JobsConfig

DEFAULT_TENANT = "default"
_TENANT_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")


class ServerSettings(BaseSettings):
    """Everything `loraswap serve` can be told, by flag or by `LORASWAP_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="LORASWAP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    base: str = "default"
    served_model_name: str | None = None  # the base's id in /v1/models; default: its directory name
    quant: Literal["nf4", "none"] = "nf4"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    store: Path | None = None
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_rank: int = 64
    max_model_len: int = 2048
    max_num_seqs: int = 32
    fold: Literal["off", "auto", "pinned"] = "auto"
    kv_cache_mb: int = 512
    api_keys_file: Path | None = None
    api_keys: str | None = None
    max_concurrent_per_tenant: int = 16
    max_queue: int = 64
    max_upload_mb: int = 512
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    # fine-tuning jobs (jobs/): database, uploaded files, quotas, the sidecar's credential
    jobs_dir: Path | None = None
    jobs_db: Path | None = None
    files_dir: Path | None = None
    max_file_mb: int = 64
    max_files_per_tenant: int = 100
    max_active_jobs_per_tenant: int = 4
    service_key: str | None = None
    train_in_process: bool = False

    def to_config(self) -> "ServerConfig":
        keys = parse_api_keys(self.api_keys or "")
        if self.api_keys_file is not None:
            lines = Path(self.api_keys_file).read_text().splitlines()
            keys += parse_api_keys(",".join(line for line in lines if not line.lstrip().startswith("#")))
        return ServerConfig(
            host=self.host,
            port=self.port,
            base=self.base,
            served_model_name=self.served_model_name,
            quant=self.quant,
            dtype=self.dtype,
            device=self.device,
            store=self.store,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_rank=self.max_rank,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            fold=self.fold,
            kv_cache_bytes=self.kv_cache_mb * 1024 * 1024,
            api_keys=tuple(keys),
            max_concurrent_per_tenant=self.max_concurrent_per_tenant,
            max_queue=self.max_queue,
            max_upload_bytes=self.max_upload_mb * 1024 * 1024,
            retry_after_s=self.retry_after_s,
            drain_timeout_s=self.drain_timeout_s,
            jobs=JobsConfig(root=self.jobs_dir, db_path=self.jobs_db, files_dir=self.files_dir,
                            max_file_bytes=self.max_file_mb * 1024 * 1024,
                            max_files_per_tenant=self.max_files_per_tenant,
                            max_active_jobs_per_tenant=self.max_active_jobs_per_tenant,
                            service_key=self.service_key),
            train_in_process=self.train_in_process,
        )


def parse_api_keys(spec: str) -> list[tuple[str, str]]:
    """`"tenant:key,tenant:key"` -> [(tenant, key), ...]; blank entries are skipped."""
    pairs = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        tenant, sep, key = entry.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError("api_keys: each entry must look like tenant:key")
        pairs.append((tenant.strip(), key.strip()))
    return pairs


@dataclass(frozen=True)
class ServerConfig:
    """The server's settings as the code reads them. Build one in a test with `ServerConfig()`."""

    host: str = "127.0.0.1"
    port: int = 8000
    base: str = "default"
    served_model_name: str | None = None
    quant: str = "nf4"
    dtype: str = "auto"
    device: str = "auto"
    store: Path | None = None
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_rank: int = 64
    max_model_len: int = 2048
    max_num_seqs: int = 32
    fold: str = "auto"
    kv_cache_bytes: int = 512 * 1024 * 1024
    api_keys: tuple[tuple[str, str], ...] = field(default=())  # (tenant, key)
    max_concurrent_per_tenant: int = 16
    max_queue: int = 64  # requests admitted beyond max_num_seqs before 503
    max_upload_bytes: int = 512 * 1024 * 1024
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0
    jobs: JobsConfig = field(default_factory=JobsConfig)
    train_in_process: bool = False  # `serve --train-in-process`: run the trainer sidecar as a child

    def __post_init__(self):
        for name in ("max_loras", "max_cpu_loras", "max_rank", "max_model_len", "max_num_seqs",
                     "max_concurrent_per_tenant", "max_upload_bytes", "retry_after_s", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        seen_keys = set()
        for tenant, key in self.api_keys:
            if not _TENANT_RE.match(tenant):
                raise ValueError(f"api_keys: tenant name {tenant!r} must match {_TENANT_RE.pattern}")
            if key in seen_keys:
                raise ValueError(f"api_keys: the same key is given to two tenants ({tenant!r})")
            seen_keys.add(key)
        if self.jobs.service_key is not None and self.jobs.service_key in seen_keys:
            raise ValueError("service_key must differ from every tenant's API key")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def capacity(self) -> int:
        """Requests admitted at once (running + queued) before new ones get 503."""
        return self.max_num_seqs + self.max_queue

"""`JobsConfig`: where the jobs database and uploaded files live, and the per-tenant quotas.

One frozen dataclass read by both the server (files / fine-tuning API) and the sidecar
(`loraswap trainer-service`). `root` holds `jobs.db`, `files/` and `work/` (checkpoints and
finished adapters) unless `db_path` / `files_dir` name other places. With no root, the server
puts it beside its adapter store (`<store>/../jobs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class JobsConfig:
    """Settings of the files store and the job queue. Build one in a test with `JobsConfig(root=tmp)`."""

    root: Path | None = None
    db_path: Path | None = None
    files_dir: Path | None = None
    max_file_bytes: int = 64 * 1024 * 1024
    max_files_per_tenant: int = 100
    max_bytes_per_tenant: int = 1024 * 1024 * 1024
    max_active_jobs_per_tenant: int = 4  # queued + running
    max_lines_per_file: int = 100_000
    service_key: str | None = None  # the sidecar's credential for publishing into a job owner's namespace

    def __post_init__(self):
        for name in (
            "max_file_bytes",
            "max_files_per_tenant",
            "max_bytes_per_tenant",
            "max_active_jobs_per_tenant",
            "max_lines_per_file",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.service_key is not None and len(self.service_key) < 16:
            raise ValueError("service_key must be at least 16 characters")

    def with_default_root(self, root: Path | str) -> "JobsConfig":
        """This config with `root` filled in when it was not given."""
        return self if self.root is not None else replace(self, root=Path(root))

    @property
    def resolved_root(self) -> Path:
        if self.root is not None:
            return Path(self.root).expanduser()
        if os.environ.get("LORASWAP_JOBS_DIR"):
            return Path(os.environ["LORASWAP_JOBS_DIR"]).expanduser()
        data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(data_home) / "loraswap" / "jobs"

    @property
    def database(self) -> Path:
        return Path(self.db_path).expanduser() if self.db_path is not None else self.resolved_root / "jobs.db"

    @property
    def files(self) -> Path:
        return Path(self.files_dir).expanduser() if self.files_dir is not None else self.resolved_root / "files"

    @property
    def work(self) -> Path:
        """Checkpoints and finished adapters of the sidecar, one folder per job."""
        return self.resolved_root / "work"


def jobs_config_for(config: JobsConfig, store_root: Path | None) -> JobsConfig:
    """`config` with its root defaulted to beside the adapter store."""
    if config.root is None and not os.environ.get("LORASWAP_JOBS_DIR") and store_root is not None:
        return config.with_default_root(Path(store_root).parent / "jobs")
    return config

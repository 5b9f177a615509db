"""Uploaded training files: metadata rows in the jobs database, contents on disk under `files/`.

The on-disk name is the server-chosen id (`files/<id>.jsonl`); a client's file name is kept only
as metadata. Contents are written to a temporary name, fsynced and renamed, then the row is
inserted, so a crash leaves at most an orphan file, never a row without contents. Quotas (count
and total bytes per tenant) are checked inside the same write transaction as the insert.
Every lookup takes the tenant: another tenant's file answers like a missing one (`None`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.db import Database, new_id


class QuotaExceeded(Exception):
    """The tenant holds too many files or bytes; the message says which limit."""


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    lines: int
    created_at: int


class FileStore:
    """Per-tenant training files.

    Args:
        db: the shared jobs database.
        directory: where contents live (created if missing).
    """

    def __init__(self, db: Database, directory: Path | str):
        self.db = db
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        """Where `file_id`'s contents live (ids are server-made: `file-<hex>`)."""
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise ValueError(f"not a file id: {file_id!r}")
        return self.directory / f"{file_id}.jsonl"

    def create(
        self, tenant: str, filename: str, purpose: str, content: bytes, lines: int, *, max_files: int, max_bytes: int
    ) -> FileRecord:
        """Store `content` for `tenant`; QuotaExceeded when it would pass a per-tenant limit."""
        record = FileRecord(new_id("file"), tenant, filename, purpose, len(content), lines, int(time.time()))
        target = self.path(record.id)
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        try:
            with self.db.transaction() as conn:
                count, total = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM files WHERE tenant = ?", (tenant,)
                ).fetchone()
                if count + 1 > max_files:
                    raise QuotaExceeded(f"you already have {count} files (limit {max_files}); delete some first")
                if total + record.bytes > max_bytes:
                    raise QuotaExceeded(f"your files would take {total + record.bytes} bytes (limit {max_bytes})")
                os.replace(partial, target)
                conn.execute(
                    "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.id, tenant, filename, purpose, record.bytes, lines, record.created_at),
                )
        finally:
            partial.unlink(missing_ok=True)
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord | None:
        with self.db.connect() as conn:
            row = conn.execute("SELECT * FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).fetchone()
        return FileRecord(**dict(row)) if row else None

    def list(self, tenant: str, purpose: str | None = None) -> list[FileRecord]:
        """The tenant's files, newest first."""
        query = "SELECT * FROM files WHERE tenant = ?" + (" AND purpose = ?" if purpose else "")
        params = (tenant, purpose) if purpose else (tenant,)
        with self.db.connect() as conn:
            rows = conn.execute(query + " ORDER BY created_at DESC, rowid DESC", params).fetchall()
        return [FileRecord(**dict(row)) for row in rows]

    def delete(self, tenant: str, file_id: str) -> bool:
        """Remove the tenant's file; False when it has no such file."""
        with self.db.transaction() as conn:
            gone = conn.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)).rowcount
        if gone:
            self.path(file_id).unlink(missing_ok=True)
        return bool(gone)

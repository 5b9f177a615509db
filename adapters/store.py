"""The adapter store: tenant namespaces over content-addressed blobs, published atomically.

Layout under the root (default `$LORASWAP_STORE`, else `$XDG_DATA_HOME/loraswap/store`, else
`~/.local/share/loraswap/store`):

    blobs/<sha256>/            adapter_config.json, adapter_model.safetensors[, loraswap.json]
    tenants/<tenant>/<name>.json   the name's pointer: its versions and which one is current
    tmp/                       staging dirs, pointer temp files, blobs on their way out
    .lock                      flock held by every writer (publish, delete, cleanup)

Publishing writes the blob into `tmp/`, fsyncs files and directory, renames it into `blobs/`
(the blob appears whole or not at all), then replaces the pointer through a fsynced temp file
and `os.replace`. The pointer switch is the commit point: a `kill -9` anywhere leaves the old
pointer (and maybe an unreferenced blob) or the new one, and the next `AdapterStore` on that
root removes the leftovers. A record's `id` is the content id `sha256[:16]`: versions with the
same content share it (and the engine may share their loaded copy). Old versions stay
readable until the name is deleted. The store trusts that its input passed `validate_adapter_dir`
(a `ValidatedAdapter`, or the directory it accepted).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from adapters.errors import AdapterNotFound, InvalidName
from adapters.format import read_peft, write_peft
from adapters.provenance import read_provenance, write_provenance
from adapters.validate import ValidatedAdapter, content_sha256

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_name(value: str, what: str = "name") -> str:
    """Return `value` if it is a valid tenant or adapter name, else raise InvalidName."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidName(
            f"invalid {what} {value!r}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a dot",
            param="model" if what == "name" else what,
        )
    return value


def default_store_root() -> Path:
    """`$LORASWAP_STORE`, else the user's data directory; never inside the repository."""
    if os.environ.get("LORASWAP_STORE"):
        return Path(os.environ["LORASWAP_STORE"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "loraswap" / "store"


@dataclass(frozen=True)
class AdapterRecord:
    """One stored version of a tenant's adapter. `id` is `sha256[:16]` (the content id)."""

    id: str
    tenant: str
    name: str
    version: int
    sha256: str
    rank: int
    target_modules: tuple[str, ...]
    template_sha256: str | None
    created_at: int  # unix seconds


class _Version(BaseModel):
    version: int
    sha256: str
    rank: int
    target_modules: list[str]
    template_sha256: str | None
    created_at: int


class _Pointer(BaseModel):
    """The on-disk pointer file of one name."""

    tenant: str
    name: str
    current: int
    versions: list[_Version]

    def record(self, version: int | None = None) -> AdapterRecord | None:
        wanted = self.current if version is None else version
        entry = next((v for v in self.versions if v.version == wanted), None)
        if entry is None:
            return None
        fields = entry.model_dump()
        fields["target_modules"] = tuple(fields["target_modules"])
        return AdapterRecord(id=entry.sha256[:16], tenant=self.tenant, name=self.name, **fields)


class AdapterStore:
    """Per-tenant adapter names over content-addressed blobs.

    Args:
        root: the store directory (created if missing); None means `default_store_root()`.
        on_step: test seam called with the name of each publish/delete step as it completes
            (`staging`, `staged`, `blob_published`, `pointer_staged`, `published`,
            `pointer_removed`, `blob_moved`), so crash tests can kill the process there.
    """

    def __init__(self, root: Path | str | None = None, *, on_step: Callable[[str], None] | None = None):
        self.root = Path(root) if root is not None else default_store_root()
        self._on_step = on_step or (lambda step: None)
        for sub in ("blobs", "tenants", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.cleanup()

    # -- reading -------------------------------------------------------------------------

    def get(self, tenant: str, name: str, version: int | None = None) -> AdapterRecord:
        """The current (or given) version of `tenant`'s `name`; AdapterNotFound otherwise."""
        pointer = self._read_pointer(check_name(tenant, "tenant"), check_name(name))
        record = pointer.record(version) if pointer else None
        if record is None:
            raise AdapterNotFound(name)
        return record

    def list(self, tenant: str) -> list[AdapterRecord]:
        """Current versions of all of `tenant`'s adapters, sorted by name."""
        folder = self.root / "tenants" / check_name(tenant, "tenant")
        if not folder.is_dir():
            return []
        pointers = (self._read_pointer(tenant, p.stem) for p in sorted(folder.glob("*.json")))
        return [p.record() for p in pointers if p is not None]

    def versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every stored version of a name, oldest first."""
        pointer = self._read_pointer(check_name(tenant, "tenant"), check_name(name))
        if pointer is None:
            raise AdapterNotFound(name)
        return [pointer.record(v.version) for v in pointer.versions]

    def adapter_dir(self, record: AdapterRecord) -> Path:
        """The blob directory of a record: PEFT files `read_peft` and PEFT itself load."""
        return self.root / "blobs" / record.sha256

    # -- writing -------------------------------------------------------------------------

    def publish(
        self, tenant: str, name: str, adapter: ValidatedAdapter | Path | str
    ) -> tuple[AdapterRecord, bool]:
        """Make `name` point to `adapter`'s content; returns (record, created).

        Same content as the current version: that record, created False. Otherwise a new
        version (blob written once per content) that the name then points to.

        Args:
            tenant: the caller's namespace.
            name: the adapter name inside it.
            adapter: a `ValidatedAdapter`, or the directory that `validate_adapter_dir` just
                accepted (read again here through safetensors and JSON only).
        """
        check_name(tenant, "tenant")
        check_name(name)
        adapter = _as_validated(adapter)
        with self._locked():
            pointer = self._read_pointer(tenant, name)
            current = pointer.record() if pointer else None
            if current is not None and current.sha256 == adapter.sha256:
                return current, False
            self._write_blob(adapter)
            entry = _Version(
                version=max((v.version for v in pointer.versions), default=0) + 1 if pointer else 1,
                sha256=adapter.sha256,
                rank=adapter.rank,
                target_modules=adapter.target_modules,
                template_sha256=adapter.provenance.chat_template_sha256 if adapter.provenance else None,
                created_at=int(time.time()),
            )
            versions = (pointer.versions if pointer else []) + [entry]
            new = _Pointer(tenant=tenant, name=name, current=entry.version, versions=versions)
            self._write_pointer(new)
            self._on_step("published")
            return new.record(), True

    def delete(self, tenant: str, name: str) -> AdapterRecord:
        """Remove a name and all its versions; blobs no other name uses go too."""
        check_name(tenant, "tenant")
        check_name(name)
        with self._locked():
            pointer = self._read_pointer(tenant, name)
            if pointer is None:
                raise AdapterNotFound(name)
            path = self._pointer_path(tenant, name)
            path.unlink()
            _fsync_dir(path.parent)  # the commit point of a delete
            self._on_step("pointer_removed")
            self._collect_garbage()
            return pointer.record()

    def cleanup(self) -> list[str]:
        """Remove crash leftovers: anything in tmp/ and blobs no pointer references."""
        with self._locked():
            return self._clear_tmp() + self._collect_garbage()

    # -- internals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock is per open file description: threads and processes exclude each other alike.
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _pointer_path(self, tenant: str, name: str) -> Path:
        return self.root / "tenants" / tenant / f"{name}.json"

    def _read_pointer(self, tenant: str, name: str) -> _Pointer | None:
        try:
            text = self._pointer_path(tenant, name).read_text()
        except FileNotFoundError:
            return None
        return _Pointer.model_validate_json(text)

    def _write_blob(self, adapter: ValidatedAdapter) -> None:
        blob = self.root / "blobs" / adapter.sha256
        if blob.is_dir():  # renamed in whole, so complete: same content is stored once
            return
        staging = self.root / "tmp" / f"stage-{uuid.uuid4().hex}"
        write_peft(adapter.weights, staging)
        self._on_step("staging")
        if adapter.provenance is not None:
            write_provenance(adapter.provenance, staging)
        for f in staging.iterdir():
            _fsync_file(f)
        _fsync_dir(staging)
        self._on_step("staged")
        os.rename(staging, blob)
        _fsync_dir(blob.parent)
        self._on_step("blob_published")

    def _write_pointer(self, pointer: _Pointer) -> None:
        target = self._pointer_path(pointer.tenant, pointer.name)
        if not target.parent.is_dir():
            target.parent.mkdir()
            _fsync_dir(target.parent.parent)
        temp = self.root / "tmp" / f"pointer-{uuid.uuid4().hex}.json"
        with open(temp, "w") as fh:
            fh.write(pointer.model_dump_json(indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        self._on_step("pointer_staged")
        os.replace(temp, target)
        _fsync_dir(target.parent)

    def _referenced(self) -> set[str]:
        shas = set()
        for path in (self.root / "tenants").glob("*/*.json"):
            shas.update(v.sha256 for v in _Pointer.model_validate_json(path.read_text()).versions)
        return shas

    def _collect_garbage(self) -> list[str]:
        """Move unreferenced blobs out of blobs/ (atomically), then delete them."""
        referenced = self._referenced()
        removed = []
        for blob in (self.root / "blobs").iterdir():
            if blob.name in referenced and _SHA256.fullmatch(blob.name):
                continue
            trash = self.root / "tmp" / f"trash-{uuid.uuid4().hex}"
            os.rename(blob, trash)
            self._on_step("blob_moved")
            _remove(trash)
            removed.append(f"blobs/{blob.name}")
        return removed

    def _clear_tmp(self) -> list[str]:
        removed = []
        for leftover in (self.root / "tmp").iterdir():
            _remove(leftover)
            removed.append(f"tmp/{leftover.name}")
        return removed


def _as_validated(adapter: ValidatedAdapter | Path | str) -> ValidatedAdapter:
    if isinstance(adapter, ValidatedAdapter):
        if content_sha256(adapter.weights, adapter.provenance) != adapter.sha256:
            raise ValueError("ValidatedAdapter.sha256 does not match its content")
        return adapter
    weights, provenance = read_peft(adapter), read_provenance(adapter)
    return ValidatedAdapter(weights=weights, provenance=provenance, sha256=content_sha256(weights, provenance))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

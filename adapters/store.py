"""The adapter store: tenant namespaces over content-addressed blobs, published atomically.

Layout under the root (default `$LORASWAP_STORE`, else `$XDG_DATA_HOME/loraswap/store`, else
`~/.local/share/loraswap/store`):

    blobs/<sha256>/            adapter_config.json, adapter_model.safetensors[, loraswap.json]
    tenants/<tenant>/<name>.json   the name's pointer: its versions and which one is current,
                               or a tombstone once the name is deleted
    holds/<sha256>.<uuid>      one per `hold()`, flocked while held, so collection skips the blob
    tmp/                       staging dirs, pointer temp files, blobs on their way out
    .lock                      flock held by every writer (publish, delete, collection)

Publishing writes the blob into `tmp/`, fsyncs files and directory, renames it into `blobs/`
(the blob appears whole or not at all), then replaces the pointer through a fsynced temp file
and `os.replace`. The pointer switch is the commit point: a `kill -9` anywhere leaves the old
pointer (and maybe an unreferenced blob) or the new one. Deleting replaces the pointer the same
way with a tombstone, so a delete is durable before it returns and a restart never brings the
name back; the blobs go later, in `collect_garbage(in_use)`, which never removes a blob that a
live pointer references, that a content id in `in_use` names, or that someone holds. Each name
keeps its newest `max_versions_kept` versions; quotas on names and bytes per tenant are checked
inside `publish` under the lock before anything is written. A record's `id` is the content id
`sha256[:16]`: versions with the same content share it (and the engine may share their loaded
copy). The store trusts that its input passed `validate_adapter_dir` (a `ValidatedAdapter`, or
the directory it accepted).
"""

from __future__ import annotations

import builtins
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
from typing import Protocol

from pydantic import BaseModel

from adapters.errors import AdapterNotFound, InvalidName, QuotaExceeded
from adapters.format import read_peft, write_peft
from adapters.provenance import read_provenance, write_provenance
from adapters.store_holds import Holds
from adapters.store_limits import StoreLimits, adapter_bytes
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
    size_bytes: int = 0  # what the tenant's stored-bytes quota is charged for this content


class _Version(BaseModel):
    version: int
    sha256: str
    rank: int
    target_modules: list[str]
    template_sha256: str | None
    created_at: int
    size_bytes: int = 0  # charged to the tenant's quota; 0 in pointers written before quotas


class _Pointer(BaseModel):
    """The on-disk pointer file of one name: its versions, or a tombstone after a delete."""

    tenant: str
    name: str
    current: int | None
    versions: list[_Version]
    deleted: bool = False
    # Version numbers keep counting across prunes and deletes.
    last_version: int = 0
    # Contents this name no longer points to (pruned or deleted versions) that a request may
    # still be using: only `collect_garbage(in_use)`, which knows, removes them.
    retired_sha256: list[str] = []

    @property
    def live(self) -> bool:
        return not self.deleted

    def next_version(self) -> int:
        return max([self.last_version, *(v.version for v in self.versions)]) + 1

    def record(self, version: int | None = None) -> AdapterRecord | None:
        if self.deleted:
            return None
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
        limits: per-tenant quotas and versions kept; None means `StoreLimits()`.
        on_step: test seam called with the name of each publish/delete step as it completes
            (`staging`, `staged`, `blob_published`, `pointer_staged`, `published`,
            `tombstoned`, `blob_moved`, `tombstone_removed`), so crash tests can kill the
            process there.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        limits: StoreLimits | None = None,
        on_step: Callable[[str], None] | None = None,
    ):
        self.root = Path(root) if root is not None else default_store_root()
        self.limits = limits or StoreLimits()
        self._on_step = on_step or (lambda step: None)
        for sub in ("blobs", "tenants", "tmp", "holds"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._holds = Holds(self.root / "holds")
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
        return [_known(p.record()) for p in self._tenant_pointers(check_name(tenant, "tenant")) if p.live]

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        """Every kept version of a name, oldest first."""
        pointer = self._read_pointer(check_name(tenant, "tenant"), check_name(name))
        if pointer is None or not pointer.live:
            raise AdapterNotFound(name)
        return [_known(pointer.record(v.version)) for v in pointer.versions]

    def adapter_dir(self, record: AdapterRecord) -> Path:
        """The blob directory of a record: PEFT files `read_peft` and PEFT itself load.

        The directory may be collected once the record is neither current nor in use; a reader
        that must not lose it meanwhile (a merge) uses `hold`.
        """
        return self.root / "blobs" / record.sha256

    def stored_bytes(self, tenant: str) -> int:
        """Bytes charged to `tenant`: its kept versions' distinct contents."""
        return _charged(self._tenant_pointers(check_name(tenant, "tenant")))

    @contextlib.contextmanager
    def hold(self, record: AdapterRecord) -> Iterator[Path]:
        """`with store.hold(record) as directory:` the blob stays on disk until the block ends.

        Holds are flocked files, so they protect the blob from collection in this and any other
        process sharing the root, and a holder that dies releases its hold.

        Raises:
            AdapterNotFound: the blob is already gone (collected after a delete or prune).
        """
        with self._locked():
            if not self.adapter_dir(record).is_dir():
                raise AdapterNotFound(record.name)
            hold = self._holds.acquire(record.sha256)
        with hold:
            yield self.adapter_dir(record)

    # -- writing -------------------------------------------------------------------------

    def publish(self, tenant: str, name: str, adapter: ValidatedAdapter | Path | str) -> tuple[AdapterRecord, bool]:
        """Make `name` point to `adapter`'s content; returns (record, created).

        Same content as the current version: that record, created False. Otherwise a new
        version (blob written once per content) that the name then points to; versions past
        `limits.max_versions_kept` are dropped from the pointer (their blobs go at collection).

        Args:
            tenant: the caller's namespace.
            name: the adapter name inside it.
            adapter: a `ValidatedAdapter`, or the directory that `validate_adapter_dir` just
                accepted (read again here through safetensors and JSON only).

        Raises:
            QuotaExceeded: 403 `quota_exceeded`, param `adapters` (a new name over
                `max_adapters_per_tenant`) or `stored_bytes` (over `max_stored_bytes_per_tenant`);
                nothing is written.
        """
        check_name(tenant, "tenant")
        check_name(name)
        adapter = _as_validated(adapter)
        with self._locked():
            pointer = self._read_pointer(tenant, name)
            live = pointer if pointer is not None and pointer.live else None
            current = live.record() if live else None
            if current is not None and current.sha256 == adapter.sha256:
                return current, False
            entry = _Version(
                version=pointer.next_version() if pointer else 1,
                sha256=adapter.sha256,
                rank=adapter.rank,
                target_modules=adapter.target_modules,
                template_sha256=adapter.provenance.chat_template_sha256 if adapter.provenance else None,
                created_at=int(time.time()),
                size_bytes=adapter_bytes(adapter),
            )
            versions = (live.versions if live else []) + [entry]
            kept = versions[-self.limits.max_versions_kept :]
            retired = {*(pointer.retired_sha256 if pointer else []), *(v.sha256 for v in versions)}
            new = _Pointer(
                tenant=tenant,
                name=name,
                current=entry.version,
                versions=kept,
                last_version=entry.version,
                retired_sha256=sorted(retired - {v.sha256 for v in kept}),
            )
            self._check_quota(tenant, name, new, is_new_name=live is None)
            self._write_blob(adapter)
            self._write_pointer(new)
            self._on_step("published")
            record = new.record()
            assert record is not None  # `new` is live and its current version is in `versions`
            return record, True

    def delete(self, tenant: str, name: str, *, collect: bool = True) -> AdapterRecord:
        """Delete a name durably (a fsynced tombstone) and return its current record.

        Args:
            tenant: the caller's namespace.
            name: the adapter name.
            collect: also run `collect_garbage()` with nothing in use, removing the blobs no
                other name references at once. A server with requests in flight passes False
                and calls `collect_garbage(in_use)` itself once they allow it.
        """
        check_name(tenant, "tenant")
        check_name(name)
        with self._locked():
            pointer = self._read_pointer(tenant, name)
            if pointer is None or not pointer.live:
                raise AdapterNotFound(name)
            record = pointer.record()
            assert record is not None  # live pointer: its current version is kept
            tombstone = _Pointer(
                tenant=tenant,
                name=name,
                current=None,
                versions=[],
                deleted=True,
                last_version=pointer.next_version() - 1,
                retired_sha256=sorted({*pointer.retired_sha256, *(v.sha256 for v in pointer.versions)}),
            )
            self._write_pointer(tombstone)  # the commit point of a delete
            self._on_step("tombstoned")
            if collect:
                self._collect_garbage(set(), retired_too=True)
            return record

    def collect_garbage(self, in_use: set[str] | frozenset[str] = frozenset()) -> builtins.list[str]:
        """Remove blobs nothing needs any more, and tombstones nothing can still be using.

        A blob stays while a live pointer references it (any kept version), while `in_use`
        names it (by content id `sha256[:16]` or full sha256), or while it is held. A retired
        content (pruned or deleted) leaves its name's pointer once it is neither in use nor
        held, and a tombstone with nothing retired left goes. Returns the blobs and tombstones
        removed (paths relative to the root).
        """
        with self._locked():
            return self._collect_garbage(set(in_use), retired_too=True)

    def cleanup(self) -> builtins.list[str]:
        """Remove crash leftovers: anything in tmp/, stale holds, blobs no pointer mentions.

        Runs when a store is opened. It never removes retired contents: another process
        sharing the root may be serving them, and only `collect_garbage(in_use)` knows.
        """
        with self._locked():
            return self._clear_tmp() + self._collect_garbage(set(), retired_too=False)

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

    def _tenant_pointers(self, tenant: str) -> builtins.list[_Pointer]:
        folder = self.root / "tenants" / tenant
        if not folder.is_dir():
            return []
        pointers = (self._read_pointer(tenant, p.stem) for p in sorted(folder.glob("*.json")))
        return [p for p in pointers if p is not None]

    def _check_quota(self, tenant: str, name: str, new: _Pointer, is_new_name: bool) -> None:
        others = [p for p in self._tenant_pointers(tenant) if p.live and p.name != name]
        limits = self.limits
        if is_new_name and len(others) >= limits.max_adapters_per_tenant:
            raise QuotaExceeded(
                f"tenant '{tenant}' already has {len(others)} adapters, the most allowed "
                f"(max_adapters_per_tenant = {limits.max_adapters_per_tenant}); delete one first",
                param="adapters",
            )
        total = _charged([*others, new], self._blob_bytes)
        if total > limits.max_stored_bytes_per_tenant:
            raise QuotaExceeded(
                f"storing this adapter would bring tenant '{tenant}' to {total} bytes, over "
                f"max_stored_bytes_per_tenant = {limits.max_stored_bytes_per_tenant}",
                param="stored_bytes",
            )

    def _blob_bytes(self, sha256: str) -> int:
        blob = self.root / "blobs" / sha256
        return sum(f.stat().st_size for f in blob.iterdir()) if blob.is_dir() else 0

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

    def _collect_garbage(self, in_use: set[str], retired_too: bool) -> builtins.list[str]:
        """Move unneeded blobs out of blobs/ (atomically) and delete them; then (with
        `retired_too`) drop the retired contents nobody uses from their pointers."""
        pointers = [
            (path, _Pointer.model_validate_json(path.read_text())) for path in (self.root / "tenants").glob("*/*.json")
        ]
        referenced = {v.sha256 for _, p in pointers if p.live for v in p.versions}
        retired = {sha for _, p in pointers for sha in p.retired_sha256}
        held = self._holds.held()

        def busy(sha: str) -> bool:
            return sha in held or sha in in_use or sha[:16] in in_use or (not retired_too and sha in retired)

        removed = []
        for blob in (self.root / "blobs").iterdir():
            if _SHA256.fullmatch(blob.name) and (blob.name in referenced or busy(blob.name)):
                continue
            trash = self.root / "tmp" / f"trash-{uuid.uuid4().hex}"
            os.rename(blob, trash)
            self._on_step("blob_moved")
            _remove(trash)
            removed.append(f"blobs/{blob.name}")
        if retired_too:
            removed += self._drop_retired(pointers, busy)
        return removed

    def _drop_retired(
        self, pointers: builtins.list[tuple[Path, _Pointer]], busy: Callable[[str], bool]
    ) -> builtins.list[str]:
        """Forget retired contents nobody uses; a tombstone with nothing left goes entirely."""
        removed = []
        for path, pointer in pointers:
            still = [sha for sha in pointer.retired_sha256 if busy(sha)]
            if still == pointer.retired_sha256 and (pointer.live or still):
                continue
            if pointer.deleted and not still:
                path.unlink()
                _fsync_dir(path.parent)
                self._on_step("tombstone_removed")
                removed.append(f"tenants/{pointer.tenant}/{path.name}")
            else:
                self._write_pointer(pointer.model_copy(update={"retired_sha256": still}))
        return removed

    def _clear_tmp(self) -> builtins.list[str]:
        removed = []
        for leftover in (self.root / "tmp").iterdir():
            _remove(leftover)
            removed.append(f"tmp/{leftover.name}")
        return removed


def _known(record: AdapterRecord | None) -> AdapterRecord:
    """A record read from a live pointer's kept version, which exists by the pointer's invariant."""
    assert record is not None, "live pointer without a record for a kept version"
    return record


def _charged(pointers: list[_Pointer], blob_bytes: Callable[[str], int] | None = None) -> int:
    """Distinct contents of the live pointers' kept versions, each counted once."""
    sizes: dict[str, int] = {}
    for pointer in pointers:
        if pointer.live:
            for v in pointer.versions:
                sizes[v.sha256] = v.size_bytes or (blob_bytes(v.sha256) if blob_bytes else 0)
    return sum(sizes.values())


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


class Store(Protocol):
    """What the server needs of an adapter store: `AdapterStore` on one machine, and
    `server.cluster.store.RemoteStore` (the same calls over the single-writer Ray actor) on a cluster.
    `create_app` and `ServerState` are typed against this, never against one implementation."""

    def get(self, tenant: str, name: str, version: int | None = None) -> AdapterRecord: ...

    def list(self, tenant: str) -> builtins.list[AdapterRecord]: ...

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]: ...

    def adapter_dir(self, record: AdapterRecord) -> Path: ...

    def hold(self, record: AdapterRecord) -> contextlib.AbstractContextManager[Path]: ...

    def publish(self, tenant: str, name: str, adapter: ValidatedAdapter | Path | str) -> tuple[AdapterRecord, bool]: ...

    def delete(self, tenant: str, name: str, *, collect: bool = True) -> AdapterRecord: ...

    def collect_garbage(self, in_use: set[str] | frozenset[str] = frozenset()) -> builtins.list[str]: ...

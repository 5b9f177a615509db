"""The adapter store across machines: one `AdapterStore` owned by a single Ray actor, and its client.

Why an actor: the store's atomic-rename publish and its delete are correct for one writer on one
filesystem; serialising every write through one actor keeps exactly that guarantee without assuming a
shared POSIX filesystem between machines. Readers (the ingress, engine replicas) never touch its
disk: they ask the actor for records, and engine replicas fetch a blob's files by content id
through Ray's object store into a local read-through cache. Blobs are immutable and named by their
sha256, so a cached copy can never be stale; only pointers (name -> version) change, and every
request resolves its name through the actor, so a delete that answered is seen by every ingress.

Failure: the actor's directory should sit on a persistent volume. If its process dies, Ray restarts
it (`max_restarts`) on the same node and it reopens the directory (crash-safe by the store's own
design); if the node dies, uploads, deletes and cold loads fail (503) until it is back, while
replicas keep serving adapters they already hold. The head node's death ends the Ray cluster.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.errors import AdapterNotFound

if TYPE_CHECKING:
    from adapters.store import AdapterRecord
    from adapters.validate import ValidatedAdapter

_FILES = ("adapter_config.json", "adapter_model.safetensors", "loraswap.json")


class StoreService:
    """The actor: an `AdapterStore` at `root`, plus blob reads by content id. One writer by construction."""

    def __init__(self, root: str, quotas: dict | None = None):
        from adapters.store import AdapterStore
        from adapters.store_limits import StoreLimits

        self.store = AdapterStore(root, limits=StoreLimits(**(quotas or {})))

    def get(self, tenant: str, name: str, version: int | None = None):
        return self.store.get(tenant, name, version)

    def list(self, tenant: str):
        return self.store.list(tenant)

    def versions(self, tenant: str, name: str):
        return self.store.versions(tenant, name)

    def delete(self, tenant: str, name: str, collect: bool = True):
        return self.store.delete(tenant, name, collect=collect)

    def collect_garbage(self, in_use: frozenset[str] = frozenset()) -> builtins.list[str]:
        return self.store.collect_garbage(in_use)

    def publish(self, tenant: str, name: str, adapter):
        """Publish a `ValidatedAdapter` the ingress checked against the base (weights travel by Ray)."""
        return self.store.publish(tenant, name, adapter)

    def has_blob(self, sha256: str) -> bool:
        return (self.store.root / "blobs" / sha256).is_dir()

    def blob(self, content_id: str) -> dict[str, bytes]:
        """The files of the blob whose sha256 starts with `content_id` (the adapter id)."""
        matches = [p for p in (self.store.root / "blobs").glob(f"{content_id}*") if p.is_dir()]
        if len(matches) != 1:
            raise AdapterNotFound(content_id)
        return {p.name: p.read_bytes() for p in matches[0].iterdir() if p.name in _FILES}


class RemoteStore:
    """What the app and replicas call instead of an `AdapterStore`: the same methods, over the actor.

    Args:
        actor: the `StoreService` actor handle.
        cache: a local directory for fetched blobs (read-through; blobs are immutable).
    """

    def __init__(self, actor, cache: Path):
        self.actor = actor
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}  # sha256 -> open `hold` blocks on its local copy
        self.aio = AsyncStoreView(self)

    def _call(self, method: str, *args):
        """A blocking round trip: only from worker threads (the store pool, uploads, merges)."""
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    async def _acall(self, method: str, *args):
        """The same round trip awaited: the actor's ObjectRef is awaitable, so no thread waits."""
        return await getattr(self.actor, method).remote(*args)

    def get(self, tenant: str, name: str, version: int | None = None) -> AdapterRecord:
        return self._call("get", tenant, name, version)

    def list(self, tenant: str) -> builtins.list[AdapterRecord]:
        return self._call("list", tenant)

    def versions(self, tenant: str, name: str) -> builtins.list[AdapterRecord]:
        return self._call("versions", tenant, name)

    def delete(self, tenant: str, name: str, *, collect: bool = True) -> AdapterRecord:
        return self._call("delete", tenant, name, collect)

    def collect_garbage(self, in_use: set[str] | frozenset[str] = frozenset()) -> builtins.list[str]:
        """Collection runs in the actor; blobs this process fetched stay in its cache (immutable,
        and `adapter_dir` drops a local copy once the store no longer has the blob)."""
        return self._call("collect_garbage", frozenset(in_use))

    def publish(self, tenant: str, name: str, adapter: ValidatedAdapter | Path | str) -> tuple[AdapterRecord, bool]:
        return self._call("publish", tenant, name, adapter)

    @contextlib.contextmanager
    def hold(self, record: AdapterRecord) -> Iterator[Path]:
        """A local copy of the blob for the block (a merge reads its sources from it).

        The copy is this process's own and immutable, so the store collecting the blob meanwhile
        cannot take it away; `adapter_dir` leaves held copies alone.

        Raises:
            AdapterNotFound: the store no longer has the blob.
        """
        if not self._call("has_blob", record.sha256):
            raise AdapterNotFound(record.name)
        local = self.cache / record.sha256
        if not local.is_dir():
            self.materialize(record.id, local)
        self._held[record.sha256] = self._held.get(record.sha256, 0) + 1
        try:
            yield local
        finally:
            self._held[record.sha256] -= 1
            if not self._held[record.sha256]:
                del self._held[record.sha256]

    def _drop_stale(self, record: AdapterRecord, local: Path) -> None:
        if record.sha256 not in self._held:
            shutil.rmtree(local, ignore_errors=True)

    def adapter_dir(self, record: AdapterRecord) -> Path:
        """A local copy of the record's blob (fetched on first use); absent once the store dropped it.

        Callers use the path's existence to learn whether the content is still stored (see
        `ServerState._finish_delete`), so a stale local copy is removed when the store has none.
        """
        local = self.cache / record.sha256
        if not self._call("has_blob", record.sha256):
            self._drop_stale(record, local)
            return local
        if not local.is_dir():
            self.materialize(record.id, local)
        return local

    def materialize(self, content_id: str, local: Path | None = None) -> Path:
        """Fetch the blob with adapter id `content_id` into the cache (atomic rename), return its dir."""
        return self._write(self._call("blob", content_id), local or self.cache / content_id)

    def _write(self, files: dict[str, bytes], local: Path) -> Path:
        if local.is_dir():
            return local
        staging = Path(tempfile.mkdtemp(dir=self.cache))
        for file_name, data in files.items():
            (staging / file_name).write_bytes(data)
        try:
            staging.rename(local)
        except OSError:  # another task fetched it first; same bytes
            shutil.rmtree(staging, ignore_errors=True)
        return local


class AsyncStoreView:
    """`RemoteStore`'s lookups as coroutines, for the ingress's event loop (`ServerState.aresolve_model`).

    Every call awaits the actor's ObjectRef: a slow or busy store actor delays only the requests
    that need it, never `/health` or another tenant's stream; a fetched blob is written to the
    local cache in a worker thread.
    """

    def __init__(self, store: RemoteStore):
        self.store = store

    async def get(self, tenant: str, name: str, version: int | None = None) -> AdapterRecord:
        return await self.store._acall("get", tenant, name, version)

    async def list(self, tenant: str) -> builtins.list[AdapterRecord]:
        return await self.store._acall("list", tenant)

    async def adapter_dir(self, record: AdapterRecord) -> Path:
        """As `RemoteStore.adapter_dir`: the local copy, fetched on first use; absent once the store dropped it."""
        local = self.store.cache / record.sha256
        if not await self.store._acall("has_blob", record.sha256):
            self.store._drop_stale(record, local)
            return local
        if local.is_dir():
            return local
        files = await self.store._acall("blob", record.id)
        return await asyncio.to_thread(self.store._write, files, local)  # megabytes: not on the loop

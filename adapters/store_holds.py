"""Holds on store blobs: a reader's promise that collection leaves a blob alone meanwhile.

Each hold is a file `holds/<sha256>.<uuid>` with a shared flock on it. Collection probes every
hold file with a non-blocking exclusive flock: a probe that fails means a live holder (in this
process or another one sharing the store), a probe that succeeds means the holder is gone (it
finished, or died without cleaning up) and the file is removed. The store creates holds under
its own lock, so collection never sees a hold file before it is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import uuid
from collections.abc import Iterator
from pathlib import Path


class Holds:
    """The hold files of one store (`root` is its `holds/` folder)."""

    def __init__(self, root: Path):
        self.root = root

    def acquire(self, sha256: str) -> contextlib.AbstractContextManager[None]:
        """Take a hold now (the caller holds the store lock); release it when the context ends."""
        path = self.root / f"{sha256}.{uuid.uuid4().hex}"
        handle = open(path, "w")
        fcntl.flock(handle, fcntl.LOCK_SH)
        return self._release_after(path, handle)

    @contextlib.contextmanager
    def _release_after(self, path: Path, handle) -> Iterator[None]:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            handle.close()

    def held(self) -> set[str]:
        """sha256s someone holds now; hold files nobody holds are removed."""
        held = set()
        for path in self.root.iterdir():
            with open(path, "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.add(path.name.split(".", 1)[0])
                    continue
            path.unlink(missing_ok=True)
        return held

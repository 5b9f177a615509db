"""Crash consistency: `kill -9` a publishing (or deleting) process between any two store steps.

A delete that got as far as its tombstone is final: the restarted store never shows the name
again, whether or not the blobs had been collected.

Each case prepares a store, forks a process that publishes (or deletes) through an
`AdapterStore` whose step hook freezes it at a named step, SIGKILLs it there, then opens a fresh
`AdapterStore` on the same root. The
store must show the old state or the new one (never a half-written adapter: the adapter it
points to validates with the right sha256), and startup must have removed every leftover
(temp files, unreferenced blobs). Forking (not spawning) keeps the
children cheap: they do file I/O only, no fresh torch import.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from adapters.base import BaseInfo
from adapters.errors import AdapterNotFound
from adapters.format import write_peft
from adapters.store import AdapterStore
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights

# (case id, store holds the old version first, action, step to die at, state expected after)
CASES = [
    ("first_publish@staging", False, "publish", "staging", None),
    ("first_publish@pointer_staged", False, "publish", "pointer_staged", None),
    ("republish@staging", True, "publish", "staging", "old"),
    ("republish@staged", True, "publish", "staged", "old"),
    ("republish@blob_published", True, "publish", "blob_published", "old"),
    ("republish@pointer_staged", True, "publish", "pointer_staged", "old"),
    ("republish@published", True, "publish", "published", "new"),
    ("delete@pointer_staged", True, "delete", "pointer_staged", "old"),
    ("delete@tombstoned", True, "delete", "tombstoned", None),
    ("delete@blob_moved", True, "delete", "blob_moved", None),
    ("delete@tombstone_removed", True, "delete", "tombstone_removed", None),
    ("delete_keep_blobs@tombstoned", True, "delete_keep_blobs", "tombstoned", None),
]
FINAL_STEPS = ("published", "tombstone_removed")  # after these, nothing is left to clean up


def _publish_or_delete(root: Path, action: str, adapter, stop_at: str, marker: Path) -> None:
    """The child: run one store operation, freezing at `stop_at` until the parent kills it."""

    def on_step(step: str) -> None:
        if step == stop_at:
            marker.write_text(step)
            time.sleep(300)

    store = AdapterStore(root, on_step=on_step)
    if action == "publish":
        store.publish("acme", "bot", adapter)
    else:  # a server with requests in flight deletes without collecting, and collects later
        store.delete("acme", "bot", collect=action == "delete")
        store.collect_garbage(set())
    marker.write_text(f"finished without reaching {stop_at}")


def leftovers(root: Path) -> list[str]:
    """What a crash left behind: temp entries, tombstones and blobs no live pointer references."""
    pointers = {p: json.loads(p.read_text()) for p in root.glob("tenants/*/*.json")}
    tombstones = [p.name for p, pointer in pointers.items() if pointer.get("deleted")]
    referenced = {v["sha256"] for pointer in pointers.values() for v in pointer["versions"]}
    orphans = [b.name for b in (root / "blobs").iterdir() if b.name not in referenced]
    return sorted(os.listdir(root / "tmp")) + tombstones + orphans


def test_kill_9_at_every_step_leaves_old_or_new_state(tiny_base_dir, tmp_path):
    base = BaseInfo.from_dir(tiny_base_dir)
    old = validate_adapter_dir(write_peft(make_weights(base, rank=2, seed=1), tmp_path / "old"), base)
    new_dir = write_peft(
        make_weights(base, rank=4, seed=2), tmp_path / "new", provenance={"chat_template_sha256": base.template_sha256}
    )
    new = validate_adapter_dir(new_dir, base)
    shas = {"old": old.sha256, "new": new.sha256}

    fork = multiprocessing.get_context("fork")
    children = []
    for case_id, has_old, action, step, _ in CASES:
        root, marker = tmp_path / case_id / "store", tmp_path / case_id / "marker"
        store = AdapterStore(root)
        if has_old:
            store.publish("acme", "bot", old)
        child = fork.Process(target=_publish_or_delete, args=(root, action, new, step, marker))
        child.start()
        children.append((child, marker))
    try:
        for (case_id, *_), (child, marker) in zip(CASES, children):
            deadline = time.monotonic() + 120
            while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert child.is_alive(), f"{case_id}: the child exited ({child.exitcode}) before its step"
            assert marker.read_text() == case_id.split("@")[1], f"{case_id}: {marker.read_text()}"
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            assert child.exitcode == -signal.SIGKILL
    finally:
        for child, _ in children:
            if child.is_alive():
                child.kill()
                child.join()

    for case_id, _, _, step, expected in CASES:
        root = tmp_path / case_id / "store"
        left = leftovers(root)
        if step not in FINAL_STEPS:
            assert left, f"{case_id}: the kill left nothing behind, so it did not land mid-operation"
        store = AdapterStore(root)  # a restart: cleanup runs here
        store.collect_garbage(set())  # the server's first collection: nothing is in flight yet
        assert leftovers(root) == [], case_id
        if expected is None:
            with pytest.raises(AdapterNotFound):
                store.get("acme", "bot")
            assert list((root / "blobs").iterdir()) == [], case_id
            continue
        record = store.get("acme", "bot")
        assert record.sha256 == shas[expected], case_id
        assert validate_adapter_dir(store.adapter_dir(record), base).sha256 == record.sha256
        # The store keeps working after the crash: publishing the new content completes.
        final, _ = store.publish("acme", "bot", new)
        assert store.get("acme", "bot") == final and final.sha256 == new.sha256

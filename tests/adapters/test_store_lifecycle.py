"""Store consistency under deletes, re-uploads and readers: tombstones, collection, holds,
version pruning and per-tenant quotas.

A refusal leaves the store byte-identical; a delete is durable before it returns (a fresh
`AdapterStore` on the same root never sees the name again); collection never removes a blob
that a live pointer references, that `in_use` names, or that someone (in any process) holds.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import pytest

from adapters.base import BaseInfo
from adapters.errors import AdapterNotFound, QuotaExceeded
from adapters.format import write_peft
from adapters.store import AdapterStore
from adapters.store_limits import StoreLimits, adapter_bytes
from adapters.validate import validate_adapter_dir
from tests.adapters.helpers import make_weights, snapshot


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return BaseInfo.from_dir(tiny_base_dir)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Five validated adapters with different content (same size: rank 2)."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        validate_adapter_dir(write_peft(make_weights(base, rank=2, seed=s), root / f"a{s}"), base) for s in range(5)
    ]


def blobs(store: AdapterStore) -> set[str]:
    return {p.name for p in (store.root / "blobs").iterdir()}


def test_delete_writes_a_durable_tombstone_and_blobs_wait_for_collection(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    record, _ = store.publish("acme", "bot", adapters[0])
    deleted = store.delete("acme", "bot", collect=False)
    assert deleted == record
    pointer = json.loads((tmp_path / "store" / "tenants" / "acme" / "bot.json").read_text())
    assert pointer["deleted"] is True and pointer["versions"] == [] and pointer["last_version"] == 1
    assert blobs(store) == {record.sha256}  # still readable by requests in flight
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot")
    assert store.list("acme") == []
    with pytest.raises(AdapterNotFound):
        store.versions("acme", "bot")
    with pytest.raises(AdapterNotFound):
        store.delete("acme", "bot")

    # in use (by content id): the blob and the tombstone stay
    assert store.collect_garbage({record.id}) == []
    assert blobs(store) == {record.sha256}
    # nothing in use: both go
    removed = store.collect_garbage(set())
    assert sorted(removed) == [f"blobs/{record.sha256}", "tenants/acme/bot.json"]
    assert blobs(store) == set()


def test_a_restart_never_resurrects_a_deleted_adapter(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    store.publish("acme", "bot", adapters[0])
    store.publish("acme", "bot", adapters[1])
    store.delete("acme", "bot", collect=False)
    restarted = AdapterStore(tmp_path / "store")
    with pytest.raises(AdapterNotFound):
        restarted.get("acme", "bot")
    with pytest.raises(AdapterNotFound):
        restarted.get("acme", "bot", version=1)
    assert restarted.list("acme") == []
    # Opening a store never collects retired content: another process may still be serving it.
    assert blobs(restarted) == {adapters[0].sha256, adapters[1].sha256}
    assert len(restarted.collect_garbage(set())) == 3  # two blobs and the tombstone


def test_republish_after_delete_continues_the_version_numbers(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    store.publish("acme", "bot", adapters[0])
    old, _ = store.publish("acme", "bot", adapters[1])
    store.delete("acme", "bot", collect=False)
    again, created = store.publish("acme", "bot", adapters[1])  # same content as the deleted v2
    assert created and again.version == 3 and again.id == old.id
    assert [r.version for r in store.versions("acme", "bot")] == [3]


def test_collection_keeps_live_in_use_and_shared_blobs(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    a, _ = store.publish("acme", "bot", adapters[0])
    store.publish("acme", "bot", adapters[1])  # a is now an older, still kept version
    twin, _ = store.publish("globex", "twin", adapters[2])
    store.publish("acme", "gone", adapters[2])  # same content as globex's twin
    gone_only, _ = store.publish("acme", "solo", adapters[3])
    store.delete("acme", "gone", collect=False)
    store.delete("acme", "solo", collect=False)
    removed = store.collect_garbage({"f" * 16})  # an unrelated id in use changes nothing
    assert f"blobs/{gone_only.sha256}" in removed and f"blobs/{twin.sha256}" not in removed
    assert blobs(store) == {a.sha256, adapters[1].sha256, twin.sha256}
    assert store.get("globex", "twin") == twin


def test_old_versions_are_pruned_and_collected_unless_in_use(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store", limits=StoreLimits(max_versions_kept=2))
    records = [store.publish("acme", "bot", adapter)[0] for adapter in adapters[:4]]
    assert [r.version for r in store.versions("acme", "bot")] == [3, 4]
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot", version=1)
    assert blobs(store) == {r.sha256 for r in records}  # pruned pointer entries; blobs wait
    # a queued request still on version 1 keeps its blob; version 2 is collected
    assert store.collect_garbage({records[0].id}) == [f"blobs/{records[1].sha256}"]
    assert store.collect_garbage(set()) == [f"blobs/{records[0].sha256}"]
    assert blobs(store) == {records[2].sha256, records[3].sha256}


def test_hold_keeps_a_blob_through_delete_and_collection(tmp_path, adapters, base):
    store = AdapterStore(tmp_path / "store")
    record, _ = store.publish("acme", "bot", adapters[0])
    with store.hold(record) as directory:
        store.delete("acme", "bot")  # collects at once, but not what is held
        store.collect_garbage(set())
        assert validate_adapter_dir(directory, base).sha256 == record.sha256
    assert list((store.root / "holds").iterdir()) == []
    assert store.collect_garbage(set()) == [f"blobs/{record.sha256}", "tenants/acme/bot.json"]
    with pytest.raises(AdapterNotFound):
        with store.hold(record):
            pass


def _hold_forever(root, record, marker):
    store = AdapterStore(root)
    with store.hold(record):
        marker.write_text("held")
        time.sleep(300)


def test_a_hold_in_another_process_counts_until_that_process_dies(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    record, _ = store.publish("acme", "bot", adapters[0])
    store.delete("acme", "bot", collect=False)
    marker = tmp_path / "marker"
    child = multiprocessing.get_context("fork").Process(target=_hold_forever, args=(store.root, record, marker))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists()
        assert store.collect_garbage(set()) == []
        assert blobs(store) == {record.sha256}
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    # the dead holder's file is stale: collection removes it and then the blob
    assert store.collect_garbage(set()) == [f"blobs/{record.sha256}", "tenants/acme/bot.json"]
    assert list((store.root / "holds").iterdir()) == []


def test_adapter_count_quota_refuses_a_new_name_before_writing(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store", limits=StoreLimits(max_adapters_per_tenant=2))
    store.publish("acme", "one", adapters[0])
    store.publish("acme", "two", adapters[1])
    before = snapshot(store.root)
    with pytest.raises(QuotaExceeded) as caught:
        store.publish("acme", "three", adapters[2])
    error = caught.value
    assert (error.status, error.code, error.param) == (403, "quota_exceeded", "adapters")
    assert "max_adapters_per_tenant = 2" in error.message
    assert error.envelope()["error"]["code"] == "quota_exceeded"
    assert snapshot(store.root) == before
    # a new version of an existing name is not a new adapter; other tenants are unaffected
    assert store.publish("acme", "two", adapters[3])[1]
    assert store.publish("globex", "three", adapters[2])[1]
    # a deleted name frees its place at once (tombstones do not count)
    store.delete("acme", "one", collect=False)
    assert store.publish("acme", "three", adapters[2])[1]


def test_stored_bytes_quota_counts_kept_versions_and_never_reveals_dedup(tmp_path, adapters):
    size = adapter_bytes(adapters[0])
    assert all(adapter_bytes(a) == size for a in adapters)
    limits = StoreLimits(max_stored_bytes_per_tenant=2 * size, max_versions_kept=2)
    store = AdapterStore(tmp_path / "store", limits=limits)
    store.publish("acme", "bot", adapters[0])
    store.publish("acme", "bot", adapters[1])
    assert store.stored_bytes("acme") == 2 * size
    store.publish("acme", "twin", adapters[1])  # same content twice in one tenant: paid once
    assert store.stored_bytes("acme") == 2 * size
    before = snapshot(store.root)
    with pytest.raises(QuotaExceeded) as caught:
        store.publish("acme", "other", adapters[2])
    assert (caught.value.status, caught.value.param) == (403, "stored_bytes")
    assert f"max_stored_bytes_per_tenant = {2 * size}" in caught.value.message
    assert snapshot(store.root) == before
    # a new version that prunes the oldest stays within the quota (v1 drops out of the pointer)
    assert store.publish("acme", "bot", adapters[2])[0].version == 3
    assert store.stored_bytes("acme") == 2 * size
    # globex pays in full for content acme already stored: the same answer as fresh content
    assert store.stored_bytes("globex") == 0
    store.publish("globex", "copy", adapters[1])
    assert store.stored_bytes("globex") == size


@pytest.mark.parametrize("field", ["max_adapters_per_tenant", "max_stored_bytes_per_tenant", "max_versions_kept"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_limits_refuse_values_that_name_the_setting(field, value):
    with pytest.raises(ValueError, match=field):
        StoreLimits(**{field: value})


def test_store_root_alone_keeps_working_with_default_limits(tmp_path, adapters):
    store = AdapterStore(tmp_path / "store")
    assert store.limits == StoreLimits(64, 4 << 30, 3)
    for adapter in adapters:
        store.publish("acme", "bot", adapter)
    assert [r.version for r in store.versions("acme", "bot")] == [3, 4, 5]

"""Class: shared resources (disk, versions, slots) are bounded per tenant.

Before issue 9 there was no per-tenant quota on adapters or bytes, versions were kept forever, and
one tenant's long requests on as many adapters as there are slots held every slot, so another
tenant's adapter waited until they ended. The contract: `max_adapters_per_tenant` (12 here) and
`max_stored_bytes_per_tenant` (2 MiB here) answer 403 `quota_exceeded` with `param` "adapters" /
"stored_bytes"; at most `max_versions_kept` (2 here) versions of a name are kept; slots are
shared fairly, so bob is served while carol's streams are still running (one of hers is preempted
by recompute and gives its slot back).
"""

from __future__ import annotations

import threading
import time

from tests.adversarial.clients import (
    StreamResult,
    Victims,
    assert_envelope,
    assert_same_as_solo,
    chat_body,
    client,
    stream_chat,
    upload,
)
from tests.adversarial.hostile_adapters import valid_adapter
from tests.adversarial.server_process import LIMITS_ENV

MAX_ADAPTERS = int(LIMITS_ENV["LORASWAP_LIMITS__MAX_ADAPTERS_PER_TENANT"])
MAX_VERSIONS = int(LIMITS_ENV["LORASWAP_LIMITS__MAX_VERSIONS_KEPT"])
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _names(adv, tenant):
    with client(adv.url, tenant) as http:
        return [card["name"] for card in http.get("/v1/adapters").json()["data"]]


def _cleanup(adv, tenant, names):
    with client(adv.url, tenant) as http:
        for name in names:
            http.delete(f"/v1/adapters/{name}")


def test_adapter_count_quota(alive):
    adv = alive
    made = []
    try:
        with Victims(adv.url, adv.refs, [("bob", "bob-a")]) as victims:
            for index in range(MAX_ADAPTERS + 1):
                if len(_names(adv, "carol")) >= MAX_ADAPTERS:
                    break
                response = upload(adv.url, "carol", f"quota-{index}", valid_adapter(adv.base_info, seed=400 + index))
                if response.status_code == 403:
                    break  # stored-bytes may bind first on an implementation that counts differently
                assert response.status_code == 201, response.text
                made.append(f"quota-{index}")
            over = upload(adv.url, "carol", "quota-over", valid_adapter(adv.base_info, seed=499))
        victims.check()
        if over.status_code in (200, 201):
            made.append("quota-over")
        assert_envelope(over, 403, "quota_exceeded", ("adapters", "stored_bytes"))
        # the quota is carol's, not the server's: alice can still upload
        alice = upload(adv.url, "alice", "after-carol-quota", valid_adapter(adv.base_info, seed=498))
        assert alice.status_code == 201, alice.text
        _cleanup(adv, "alice", ["after-carol-quota"])
    finally:
        _cleanup(adv, "carol", made)


def test_stored_bytes_quota(alive):
    """Rank-64 adapters on every module (~0.5 MB each) pass the 2 MiB quota by the fifth."""
    adv = alive
    made, last = [], None
    try:
        for index in range(6):
            files = valid_adapter(adv.base_info, seed=450 + index, rank=64, targets=ALL_MODULES, b_scale=0.05)
            last = upload(adv.url, "bob", f"heavy-{index}", files)
            if last.status_code != 201:
                break
            made.append(f"heavy-{index}")
        assert_envelope(last, 403, "quota_exceeded", "stored_bytes")
    finally:
        _cleanup(adv, "bob", made)


def test_old_versions_are_pruned(alive):
    """Re-uploading one name with new content keeps at most max_versions_kept blobs for it."""
    adv = alive
    blobs = adv.server.store / "blobs"
    before = {p.name for p in blobs.iterdir()} if blobs.is_dir() else set()
    try:
        for index in range(MAX_VERSIONS + 3):
            response = upload(adv.url, "alice", "churn", valid_adapter(adv.base_info, seed=500 + index))
            assert response.status_code in (200, 201), response.text
            assert response.json()["version"] == index + 1
        # Pruned blobs are collected after the publish answers (in the store's thread), so wait
        # for the collection rather than racing it.
        deadline = time.monotonic() + 15
        while True:
            after = {p.name for p in blobs.iterdir()} - before
            if len(after) <= MAX_VERSIONS or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(after) <= MAX_VERSIONS, f"{len(after)} versions of one name kept, at most {MAX_VERSIONS} expected"
    finally:
        _cleanup(adv, "alice", ["churn"])


def test_one_tenant_cannot_hold_every_slot(alive):
    """carol streams long on 4 adapters (= --max-loras): bob's adapter is served before they end."""
    adv = alive
    adv.refs.get("bob", "bob-b", 16)
    results: list = [None] * 4
    events = [threading.Event() for _ in range(4)]

    def run(index):
        try:
            body = chat_body(f"carol-{index}", 440)
            results[index] = stream_chat(adv.url, "carol", body, events[index])
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[index] = exc
        finally:
            events[index].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    for event in events:
        event.wait(120)
    try:
        bob = stream_chat(adv.url, "bob", chat_body("bob-b", 16))
        carol_running = sum(thread.is_alive() for thread in threads)
    finally:
        for thread in threads:
            thread.join(300)
    assert bob.status == 200 and bob.done and bob.error is None, bob.raw[-500:]
    assert_same_as_solo(bob, adv.refs.get("bob", "bob-b", 16), "bob/bob-b")
    assert carol_running == 4, (
        f"bob's request finished only after {4 - carol_running} of carol's streams ended: she held every slot"
    )
    for result in results:
        assert isinstance(result, StreamResult) and result.status == 200 and result.done, result

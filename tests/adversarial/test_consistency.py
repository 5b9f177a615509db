"""Class: deletes, re-uploads and restarts never break a request in flight or resurrect an adapter.

Today, after a re-upload, DELETE only waits for requests on the *current* version, so a request
queued on the old one loses its blob and gets a 500; and DELETE answers `deleted: true` while the
removal lives only in memory, so a restart brings the adapter back. The contract: in-use
accounting per (tenant, version); DELETE is durable (a tombstone) before it answers.
"""

from __future__ import annotations

import threading
import time

from tests.adversarial.clients import (
    StreamResult,
    chat_body,
    client,
    assert_same_as_solo,
    greedy_run,
    read_metrics,
    stream_chat,
    upload,
)
from tests.adversarial.hostile_adapters import valid_adapter

LONG = 400  # tokens of carol's long streams (max_model_len is 512)


def _start(adv, tenant, body, results, index, started):
    def run():
        try:
            results[index] = stream_chat(adv.url, tenant, body, started)
        except BaseException as exc:  # noqa: BLE001 - asserted by the test
            results[index] = exc
        finally:
            started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_delete_after_reupload_keeps_the_queued_old_version_alive(alive):
    adv = alive
    v1 = valid_adapter(adv.base_info, seed=301)
    v2 = valid_adapter(adv.base_info, seed=302)
    assert upload(adv.url, "carol", "ref-v1", v1).status_code == 201
    expected = greedy_run(adv.url, "carol", "ref-v1", 32)  # v1's solo tokens, on another name
    assert upload(adv.url, "carol", "ref-v2", v2).status_code == 201
    newer = greedy_run(adv.url, "carol", "ref-v2", 32)
    with client(adv.url, "carol") as http:
        http.delete("/v1/adapters/ref-v1")
        http.delete("/v1/adapters/ref-v2")

    assert upload(adv.url, "alice", "doomed", v1).status_code == 201
    # Fill the running batch with carol's long base streams so alice's request has to queue.
    results: list = [None] * 9
    threads, events = [], []
    for i in range(8):
        events.append(threading.Event())
        threads.append(_start(adv, "carol", chat_body(adv.base_id, LONG), results, i, events[-1]))
    for event in events:
        event.wait(120)
    queued = threading.Event()
    waiting = read_metrics(adv.url)["loraswap_engine_waiting"]
    threads.append(_start(adv, "alice", chat_body("doomed", 32), results, 8, queued))
    try:
        # re-upload only once alice's request has resolved "doomed" (v1) and queues in the engine
        deadline = time.monotonic() + 60
        while read_metrics(adv.url)["loraswap_engine_waiting"] <= waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upload(adv.url, "alice", "doomed", v2).status_code in (200, 201)
        with client(adv.url, "alice") as http:
            deleted = http.delete("/v1/adapters/doomed")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["deleted"] is True
    finally:
        for thread in threads:
            thread.join(300)
    old = results[8]
    assert isinstance(old, StreamResult), f"the old version's request failed: {old!r}"
    assert old.status == 200 and old.error is None and old.done, (
        f"the request queued on the old version was broken by the delete: {old.status} {old.raw[-500:]}"
    )
    assert old.tokens != newer.tokens, "the queued request ran the re-uploaded version, not the one it asked for"
    assert_same_as_solo(old, expected, "the queued request on the old version")
    with client(adv.url, "alice") as http:
        assert http.get("/v1/adapters/doomed").status_code == 404


def test_delete_is_durable_across_a_restart(alive):
    adv = alive
    assert upload(adv.url, "alice", "ephemeral", valid_adapter(adv.base_info, seed=311)).status_code == 201
    results, started = [None], threading.Event()
    thread = _start(adv, "alice", chat_body("ephemeral", LONG), results, 0, started)
    started.wait(120)
    with client(adv.url, "alice") as http:
        # in use while deleted: the removal must be durable before the answer, not when it ends
        deleted = http.delete("/v1/adapters/ephemeral")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    # a crash right after the answer, while the stream still runs: nothing gets to finish in memory
    adv.server.proc.kill()
    adv.server.proc.wait(30)
    thread.join(60)
    adv.server.start()
    with client(adv.url, "alice") as http:
        after = http.get("/v1/adapters/ephemeral")
        listed = [c["name"] for c in http.get("/v1/adapters").json()["data"]]
    assert after.status_code == 404, f"a restart resurrected a deleted adapter: {after.text[:300]}"
    assert "ephemeral" not in listed
    # the rest of the suite's adapters survived the restart
    assert {"alice-a", "alice-b"} <= set(listed)

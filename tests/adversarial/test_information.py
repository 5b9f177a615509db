"""Class: no tenant observes or changes another's state (metrics, residency, pins, error text).

Today `/metrics` needs no key and is labelled with tenant and adapter names; residency and pins
are keyed by content id, so bob uploading alice's exact bytes sees her residency and pin in his
201, and his unpin removes her pin. The contract: /metrics needs the admin key (401 otherwise,
including with a tenant's key); a tenant's cards show only its own use and its own pin; one
tenant's unpin never removes another's pin.
"""

from __future__ import annotations

import httpx

from tests.adversarial.clients import Victims, assert_clean, assert_envelope, client, upload
from tests.adversarial.hostile_adapters import valid_adapter
from tests.adversarial.server_process import ADMIN_KEY


def test_metrics_need_the_admin_key(alive):
    adv = alive
    with Victims(adv.url, adv.refs, [("bob", "bob-a")]) as victims:
        keyless = httpx.get(f"{adv.url}/metrics", timeout=30)
        with client(adv.url, "alice") as http:
            tenant_keyed = http.get("/metrics")
    victims.check()
    assert_envelope(keyless, 401)
    assert_envelope(tenant_keyed, 401)
    admin = httpx.get(f"{adv.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert admin.status_code == 200, admin.text[:300]
    assert "loraswap_" in admin.text


def test_identical_bytes_share_no_pin_or_residency(alive):
    adv = alive
    files = valid_adapter(adv.base_info, seed=77)
    with client(adv.url, "alice") as alice, client(adv.url, "bob") as bob:
        assert upload(adv.url, "alice", "twin", files).status_code == 201
        try:
            served = alice.post(
                "/v1/chat/completions",
                json={
                    "model": "twin",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "temperature": 0,
                },
            )
            assert served.status_code == 200, served.text
            assert alice.post("/v1/adapters/twin/pin").status_code == 200

            created = upload(adv.url, "bob", "twin-copy", files)
            assert created.status_code == 201, created.text
            card = created.json()
            assert card["pinned"] in (False, None), "bob's 201 shows alice's pin on the same bytes"
            assert card["residency"] in (None, "disk"), (
                f"bob's 201 shows alice's residency {card['residency']!r} for bytes he never used"
            )
            assert card.get("folded") in (False, None)
            listed = {c["name"]: c for c in bob.get("/v1/adapters").json()["data"]}
            assert listed["twin-copy"]["pinned"] in (False, None)
            assert listed["twin-copy"]["residency"] in (None, "disk")

            unpinned = bob.post("/v1/adapters/twin-copy/unpin")
            assert unpinned.status_code == 200, unpinned.text
            mine = alice.get("/v1/adapters/twin").json()
            assert mine["pinned"] is True, "bob's unpin removed alice's pin on the same bytes"
            # bob's listing and errors never mention alice's names
            assert 'twin"' not in bob.get("/v1/adapters").text.replace("twin-copy", "")
        finally:
            alice.post("/v1/adapters/twin/unpin")
            alice.delete("/v1/adapters/twin")
            bob.delete("/v1/adapters/twin-copy")


def test_another_tenants_adapter_answers_like_a_missing_one(alive):
    adv = alive
    with client(adv.url, "bob") as bob:
        theirs = bob.post(
            "/v1/chat/completions",
            json={"model": "alice-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        missing = bob.post(
            "/v1/chat/completions",
            json={"model": "no-such-adapter-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        theirs_get, missing_get = bob.get("/v1/adapters/alice-a"), bob.get("/v1/adapters/no-such-adapter-x")
    for a, b in ((theirs, missing), (theirs_get, missing_get)):
        error_a, error_b = assert_envelope(a, 404), assert_envelope(b, 404)
        assert (error_a["code"], error_a["param"]) == (error_b["code"], error_b["param"])
        assert error_a["message"].replace("alice-a", "X") == error_b["message"].replace("no-such-adapter-x", "X")


def test_error_messages_carry_no_paths(alive):
    """Every way we know to make the server describe a file problem: none names a path."""
    adv = alive
    good = valid_adapter(adv.base_info, seed=88)
    broken_weights = {**good, "adapter_model.safetensors": good["adapter_model.safetensors"][:-100]}
    bad_header = {**good, "adapter_model.safetensors": b"\xff" * 8 + b"{not json"}
    bad_config = {**good, "adapter_config.json": b'{"r": '}
    pickled = {**good, "adapter_model.bin": b"\x80\x04K\x01."}
    for index, files in enumerate((broken_weights, bad_header, bad_config, pickled)):
        response = upload(adv.url, "alice", f"pathless-{index}", files)
        assert 400 <= response.status_code < 500, f"case {index}: {response.status_code} {response.text[:300]}"
        assert_clean(response.text)
    with client(adv.url, "alice") as http:
        for path in ("/v1/adapters/..%2F..%2Fetc", "/v1/models/../../etc/passwd", "/v1/adapters/%00"):
            response = http.get(path)
            assert response.status_code < 500, f"{path}: {response.status_code}"
            assert_clean(response.text)

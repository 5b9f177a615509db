"""`POST /v1/adapters/merge`: a new adapter from the caller's own ones, published like an upload."""

from __future__ import annotations

import torch

from adapters.format import read_peft
from tests.server.conftest import upload


def _delta(weights, path):
    module = weights.modules.get(path)
    return module.delta() if module is not None else 0


def test_cat_merge_publishes_the_exact_weighted_sum(fake_server, peft_adapters):
    http = fake_server.client()
    assert upload(http, "a", peft_adapters["a"]).status_code == 201
    assert upload(http, "b", peft_adapters["b"]).status_code == 201
    body = {"name": "ab", "method": "cat", "adapters": [{"name": "a", "weight": 0.7}, {"name": "b", "weight": -0.3}]}
    response = http.post("/v1/adapters/merge", json=body)
    assert response.status_code == 201, response.text
    card = response.json()
    # a (rank 4, q/v) and b (rank 8, o/down) touch different modules: cat keeps each rank
    assert card["name"] == "ab" and card["rank"] == 8
    merged = read_peft(fake_server.store.adapter_dir(fake_server.store.get("alice", "ab")))
    a, b = read_peft(peft_adapters["a"]), read_peft(peft_adapters["b"])
    for path in set(a.modules) | set(b.modules):
        expected = 0.7 * _delta(a, path) - 0.3 * _delta(b, path)
        torch.testing.assert_close(merged.modules[path].delta(), expected, rtol=1e-5, atol=1e-6)
    assert http.post("/v1/adapters/merge", json=body).status_code == 200  # same content again
    chat = http.post(
        "/v1/chat/completions", json={"model": "ab", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert chat.status_code == 200, chat.text


def test_merge_sees_only_the_callers_adapters_and_names_bad_requests(fake_server, peft_adapters):
    alice, bob = fake_server.client("alice"), fake_server.client("bob")
    assert upload(alice, "a", peft_adapters["a"]).status_code == 201
    assert upload(bob, "mine", peft_adapters["b"]).status_code == 201
    before = sorted(a["name"] for a in alice.get("/v1/adapters").json()["data"])

    crossed = alice.post(
        "/v1/adapters/merge", json={"name": "x", "method": "linear", "adapters": [{"name": "a"}, {"name": "mine"}]}
    )
    missing = alice.post(
        "/v1/adapters/merge", json={"name": "x", "method": "linear", "adapters": [{"name": "a"}, {"name": "nothing"}]}
    )
    assert crossed.status_code == missing.status_code == 404
    assert crossed.json()["error"]["message"].replace("mine", "N") == missing.json()["error"]["message"].replace(
        "nothing", "N"
    )

    bad_method = alice.post("/v1/adapters/merge", json={"name": "x", "method": "average", "adapters": [{"name": "a"}]})
    assert bad_method.status_code == 400 and "average" in bad_method.json()["error"]["message"]
    bad_density = alice.post(
        "/v1/adapters/merge", json={"name": "x", "method": "ties", "density": 0, "adapters": [{"name": "a"}]}
    )
    assert bad_density.status_code == 400 and "density" in bad_density.json()["error"]["message"]
    bad_name = alice.post("/v1/adapters/merge", json={"name": "../x", "method": "cat", "adapters": [{"name": "a"}]})
    assert bad_name.status_code == 400
    assert sorted(a["name"] for a in alice.get("/v1/adapters").json()["data"]) == before


def test_ties_merge_reports_svd_error_in_provenance(fake_server, peft_adapters):
    http = fake_server.client()
    upload(http, "a", peft_adapters["a"])
    upload(http, "b", peft_adapters["b"])
    response = http.post(
        "/v1/adapters/merge",
        json={"name": "t", "method": "ties", "density": 0.5, "rank": 2, "adapters": [{"name": "a"}, {"name": "b"}]},
    )
    assert response.status_code == 201, response.text
    assert response.json()["rank"] == 2
    from adapters.provenance import read_provenance

    provenance = read_provenance(fake_server.store.adapter_dir(fake_server.store.get("alice", "t")))
    merge = provenance.model_dump()["merge"]
    assert merge["method"] == "ties" and merge["svd_errors"] and 0 < merge["svd_error_max"] < 1

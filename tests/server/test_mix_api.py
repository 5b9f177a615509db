"""The `adapters` mix field at the HTTP edge (server/mix.py), over the fake engine: what reaches the
engine, in-use accounting while a mix runs, and every refusal in OpenAI's error envelope."""

from __future__ import annotations

import asyncio

import pytest

from tests.server.conftest import upload, write_peft_adapter
from tests.server.live import wait_until

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def server(make_fake_server, peft_adapters, tiny_base_dir, tmp_path):
    server = make_fake_server(max_rank=8)
    alice = server.client("alice")
    for name, directory in (("a", peft_adapters["a"]), ("b", peft_adapters["b"])):
        assert upload(alice, name, directory).status_code == 201
    # rank 8 on q/v: with `a` (rank 4 on q/v) a mix needs rank 12 there, above max_rank 8
    assert upload(alice, "c8", write_peft_adapter(tiny_base_dir, tmp_path / "c8", seed=3, rank=8)).status_code == 201
    assert upload(server.client("bob"), "bobs", peft_adapters["a"]).status_code == 201
    return server


def _chat(server, tenant="alice", **fields):
    body = {"model": server.state.base_id, "messages": USER, "max_tokens": 4, **fields}
    return server.client(tenant).post("/v1/chat/completions", json=body)


def _error(response, status: int, param: str = "adapters") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


def test_a_mix_reaches_the_engine_as_one_adapter_named_by_content(server):
    first = _chat(server, adapters=[{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.3}])
    assert first.status_code == 200, first.text
    assert first.json()["model"] == server.state.base_id
    seen = server.engine.adapters_seen[first.json()["id"]]
    assert seen is not None and seen.startswith("mix:")
    reordered = _chat(server, adapters=[{"name": "b", "weight": 0.3}, {"name": "a", "weight": 0.7}])
    assert server.engine.adapters_seen[reordered.json()["id"]] == seen  # same mix: one slot, one cache key
    other = _chat(server, adapters=[{"name": "a", "weight": 0.7}, {"name": "b", "weight": 0.4}])
    assert server.engine.adapters_seen[other.json()["id"]] != seen
    # the mix is no adapter of the tenant's: not listed anywhere
    listed = {m["id"] for m in server.client().get("/v1/models").json()["data"]}
    assert not any(model.startswith("mix:") for model in listed)
    assert {a["name"] for a in server.client().get("/v1/adapters").json()["data"]} == {"a", "b", "c8"}


def test_the_completions_route_takes_a_mix_too(server):
    body = {"model": server.state.base_id, "prompt": "Hi", "max_tokens": 3, "adapters": [{"name": "a"}]}
    response = server.client().post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert server.engine.adapters_seen[f"{response.json()['id']}-0"].startswith("mix:")
    bad = server.client().post("/v1/completions", json={**body, "adapters": [{"name": "nope"}]})
    assert _error(bad, 404)["code"] == "model_not_found"


def test_every_adapter_of_a_running_mix_is_in_use(server):
    http = server.client()
    server.engine.gate.clear()
    body = {
        "model": server.state.base_id,
        "messages": USER,
        "max_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "adapters": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}],
    }
    stream = http.send(http.build_request("POST", "/v1/chat/completions", json=body), stream=True)
    assert stream.status_code == 200
    assert wait_until(lambda: len(server.engine.running) == 1)
    ids = {server.store.get("alice", name).id for name in ("a", "b")}
    assert {aid for tenant, aid in server.state.inflight.counts if tenant == "alice"} == ids
    # a DELETE of a component waits for the mix's request: its blob stays until the request ends
    blob = server.store.adapter_dir(server.store.get("alice", "b"))  # (bob shares a's blob, not b's)
    ids_of_b = server.store.get("alice", "b").id
    assert server.client().delete("/v1/adapters/b").status_code == 200
    assert blob.is_dir()
    server.engine.gate.set()
    text = "".join(stream.iter_text())
    stream.close()
    assert text.rstrip().endswith("data: [DONE]")
    assert wait_until(lambda: not server.state.inflight.counts)
    assert wait_until(lambda: not blob.exists())
    # its content is gone everywhere: the engine drops it and the mixes composed from it
    mix_id = next(iter(server.engine.adapters_seen.values()))
    assert wait_until(lambda: {mix_id, ids_of_b} <= set(server.engine.forgotten))


@pytest.mark.parametrize(
    "adapters, why",
    [
        ([{"name": n} for n in ("a", "b", "c8", "a", "b")], "1 to 4 adapters"),
        ([], "1 to 4 adapters"),
        ([{"name": "a", "weight": 10.5}], "finite number in [-10, 10]"),
        ([{"name": "a", "weight": -11}], "finite number in [-10, 10]"),
        ([{"name": "a", "weight": 1}, {"name": "a", "weight": 2}], "more than once"),
    ],
)
def test_bad_mixes_are_400_naming_adapters(server, adapters, why):
    error = _error(_chat(server, adapters=adapters), 400)
    assert why in error["message"] and error["type"] == "invalid_request_error"


def test_non_finite_weights_are_400(server):
    http = server.client()
    for raw in ("NaN", "Infinity", "-Infinity"):
        content = (
            '{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], '
            '"adapters": [{"name": "a", "weight": %s}]}' % (server.state.base_id, raw)
        )
        response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "adapters"


def test_model_must_be_the_base_with_a_mix(server):
    # the same answer for the caller's adapter, another tenant's and a name that does not exist
    errors = [_error(_chat(server, model=name, adapters=[{"name": "a"}]), 400) for name in ("a", "bobs", "nope")]
    assert errors[0] == errors[1] == errors[2]
    assert "base model" in errors[0]["message"]


def test_another_tenants_adapter_answers_like_a_missing_one(server):
    theirs = _error(_chat(server, adapters=[{"name": "a"}, {"name": "bobs"}]), 404)
    missing = _error(_chat(server, adapters=[{"name": "a"}, {"name": "nope"}]), 404)
    assert theirs == {**missing, "message": missing["message"].replace("nope", "bobs")}
    assert theirs["code"] == "model_not_found"
    invalid = _error(_chat(server, adapters=[{"name": "../x"}]), 404)
    assert invalid["code"] == "model_not_found"


def test_a_mix_above_max_rank_is_400(server):
    error = _error(_chat(server, adapters=[{"name": "a"}, {"name": "c8"}]), 400)
    assert "rank 12" in error["message"] and "max_rank=8" in error["message"]
    # apart, both are fine: the bound is the mix's summed rank
    assert _chat(server, adapters=[{"name": "c8"}]).status_code == 200


def test_a_mix_out_of_the_upload_bounds_is_422(server):
    # `a` alone measures a few times the base's norm at most; ten times it passes no upload bound
    error = _error(_chat(server, adapters=[{"name": "a", "weight": 10.0}, {"name": "c8", "weight": 10.0}]), 400)
    assert "rank" in error["message"]  # the cheaper rank check comes first
    error = _error(_chat(server, adapters=[{"name": "c8", "weight": 10.0}]), 422)
    assert error["code"] == "adapter_out_of_range" and "the mix is out of range" in error["message"]


def test_max_mix_adapters_is_a_limit(make_fake_server, peft_adapters):
    from server.limits import Limits

    server = make_fake_server(limits=Limits(max_mix_adapters=1, max_mix_weight=2.0))
    assert upload(server.client(), "a", peft_adapters["a"]).status_code == 201
    assert upload(server.client(), "b", peft_adapters["b"]).status_code == 201
    error = _error(_chat(server, adapters=[{"name": "a"}, {"name": "b"}]), 400)
    assert "1 to 1 adapters" in error["message"]
    assert "[-2, 2]" in _error(_chat(server, adapters=[{"name": "a", "weight": 3}]), 400)["message"]
    assert _chat(server, adapters=[{"name": "a", "weight": 2}]).status_code == 200


def test_a_mix_whose_adapter_changed_meanwhile_is_409(server, tiny_base_dir, tmp_path):
    from server.api.protocol import MixComponent
    from server.errors import Conflict
    from server.mix import _lookup, resolve_again

    state, base = server.state, server.state.base_id
    mix = [MixComponent(name="a", weight=0.5), MixComponent(name="b")]
    first = asyncio.run(_lookup(state, "alice", base, mix))  # what the route resolved before rendering
    assert asyncio.run(resolve_again(state, "alice", base, mix, first)) == first
    newer = write_peft_adapter(tiny_base_dir, tmp_path / "a2", seed=7)
    assert upload(server.client(), "a", newer).status_code == 201  # a new version of `a`
    with pytest.raises(Conflict) as refused:
        asyncio.run(resolve_again(state, "alice", base, mix, first))
    assert refused.value.status == 409 and refused.value.param == "adapters"

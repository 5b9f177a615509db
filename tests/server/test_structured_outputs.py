"""Structured outputs through the official client, on the real engine over the tiny random base.

The tiny base writes noise, so every valid JSON value below is the grammar's doing: temperature-1
samples that parse and validate, `chat.completions.parse` with a pydantic model, streaming, and a
batch that mixes constrained and free requests on different adapters (the free ones must equal
their solo greedy output: masks never leak across rows). Bad schemas answer 400 naming the problem.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import upload, write_peft_adapter
from tests.server.real import openai_client

USER = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    """Bounded fields: a noise model's free strings never end, so lengths are part of the schema."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=130)
    role: Literal["admin", "user", "guest"]
    tags: list[Annotated[str, Field(max_length=6)]] = Field(max_length=3)


PERSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "person", "strict": True, "schema": Person.model_json_schema()},
}
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["a", "b", "c"]},
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["name", "ok", "n", "kind", "xs"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(real_server, tiny_base_dir, tmp_path_factory):
    """The session's real server with two adapters of this module's own."""
    import httpx

    root = tmp_path_factory.mktemp("structured-adapters")
    with httpx.Client(base_url=real_server.url, timeout=120) as http:
        for name, seed in (("ada", 1), ("bob", 2)):
            response = upload(http, name, write_peft_adapter(tiny_base_dir, root / name, seed=seed, scale=3.0))
            assert response.status_code in (200, 201), response.text
    return real_server


def _client(server) -> openai.OpenAI:
    return openai_client(server)


def _check_bounded(value: dict) -> None:
    assert set(value) == {"name", "ok", "n", "kind", "xs"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["ok"], bool) and value["kind"] in "abc"
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 999
    assert len(value["xs"]) <= 3 and all(isinstance(x, int) and 0 <= x <= 9 for x in value["xs"])


def test_temperature_one_samples_always_validate(server):
    client = _client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "bounded", "strict": True, "schema": BOUNDED}}
    for seed in range(12):
        response = client.chat.completions.create(
            model=server.state.base_id, messages=USER, temperature=1.0, seed=seed, max_tokens=200, response_format=fmt
        )
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _check_bounded(json.loads(choice.message.content))


def test_parse_with_a_pydantic_model_and_an_adapter(server):
    client = _client(server)
    completion = client.chat.completions.parse(
        model="ada",
        messages=USER,
        response_format=Person,
        temperature=0.7,
        seed=5,
        max_tokens=300,
        extra_body={"presence_penalty": 0.5, "min_p": 0.01},
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Person)
    assert Person.model_validate_json(message.content) == message.parsed


def test_a_schema_streams_valid_json(server):
    client = _client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED}}
    stream = client.chat.completions.create(
        model="bob", messages=USER, temperature=1.0, seed=11, max_tokens=200, response_format=fmt, stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    _check_bounded(json.loads(text))


def test_json_object_with_logit_bias_toward_closing(server, tiny_tokenizer):
    """Free-form JSON strings from a noise model run long; a bias toward '"' and '}' (which the grammar
    still only allows where they are valid) lets the object close: what comes out parses."""
    quote, brace = (tiny_tokenizer(c, add_special_tokens=False)["input_ids"] for c in '"}')
    assert len(quote) == len(brace) == 1
    client = _client(server)
    for seed in range(4):
        response = client.chat.completions.create(
            model="ada",
            messages=USER,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
            response_format={"type": "json_object"},
            logit_bias={str(quote[0]): 8, str(brace[0]): 8},
        )
        assert response.choices[0].finish_reason == "stop", response.choices[0].message.content
        assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_a_mixed_batch_keeps_every_row_to_its_own_constraint(server):
    """Constrained and free requests, base and two adapters, at once: the constrained ones validate and
    the free greedy ones equal their output when run alone."""
    client = _client(server)
    bounded = {"type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED}}

    def ask(model, response_format=None, seed=0):
        extra = {"response_format": response_format} if response_format else {}
        temperature = 1.0 if response_format else 0.0
        return client.chat.completions.create(
            model=model, messages=USER, max_tokens=120 if extra else 16, temperature=temperature, seed=seed, **extra
        ).choices[0]

    free_models = ["ada", "bob", server.state.base_id]
    alone = [ask(model).message.content for model in free_models]
    jobs = [
        ("ada", bounded, 1),
        ("bob", None, 0),
        (server.state.base_id, PERSON_FORMAT, 2),
        ("ada", None, 0),
        ("bob", bounded, 3),
        (server.state.base_id, None, 0),
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    for (model, fmt, _), choice in zip(jobs, results):
        if fmt is bounded:
            _check_bounded(json.loads(choice.message.content))
        elif fmt is PERSON_FORMAT:
            assert choice.finish_reason == "stop", choice.message.content
            Person.model_validate_json(choice.message.content)
        else:
            assert choice.message.content == alone[free_models.index(model)]
    assert len(set(alone)) == 3  # the adapters really differ, so "equal to alone" proves something
    assert any(not c.message.content.lstrip().startswith("{") for c in results[1::2])


@pytest.mark.parametrize(
    "response_format, param, words",
    [
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
                },
            },
            "response_format",
            ["Unimplemented", "not"],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strong"}}},
            "response_format",
            ["strong"],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
            "response_format",
            ["nowhere"],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": [1, 2]}},
            "response_format.json_schema.schema",
            ["JSON object"],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["y" * 1000] * 40}}},
            "response_format.json_schema.schema",
            ["larger than"],
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
            "response_format.json_schema.name",
            ["name"],
        ),
        ({"type": "json_schema"}, "response_format.json_schema", ["json_schema"]),
        ({"type": "xml"}, "response_format.type", ["json_object"]),
    ],
)
def test_bad_schemas_are_400_naming_the_problem(server, response_format, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).chat.completions.create(
            model=server.state.base_id, messages=USER, max_tokens=4, response_format=response_format
        )
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param
    for word in words:
        assert word in error["message"]


def test_grammar_cache_is_per_tenant_and_bounded(server):
    from server.engine.grammar import GrammarCache, GrammarSpec

    cache = GrammarCache(server.state.tokenizer, server.state.template.end_of_turn_ids, per_tenant=2)
    specs = [GrammarSpec.json_schema({"type": "integer", "maximum": i}) for i in range(3)]
    first = cache.compile("alice", specs[0])
    assert cache.compile("alice", specs[0]) is first and cache.compiles == 1
    assert cache.get("bob", specs[0]) is None  # another tenant never sees alice's entry
    cache.compile("alice", specs[1])
    cache.compile("alice", specs[2])
    assert cache.get("alice", specs[0]) is None and cache.get("alice", specs[2]) is not None


def test_compiles_in_flight_are_bounded_per_tenant(tiny_tokenizer):
    import asyncio
    from types import SimpleNamespace

    from server.api.decoding import COMPILES_PER_TENANT, compile_grammar
    from server.api.errors import RateLimited
    from server.engine.grammar import GrammarCache, GrammarSpec

    cache = GrammarCache(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    state = SimpleNamespace(grammars=cache)
    spec = GrammarSpec.json_schema({"type": "integer"})
    cache.compiling["alice"] = COMPILES_PER_TENANT  # alice's compiles are all still running
    with pytest.raises(RateLimited):
        asyncio.run(compile_grammar(state, "alice", spec))
    assert asyncio.run(compile_grammar(state, "bob", spec)) is not None  # bob is not held up by alice
    assert cache.compiling["bob"] == 0

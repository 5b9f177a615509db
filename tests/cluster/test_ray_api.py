"""The rest of the API through the Ray ingress (the session's 2-replica cluster, tiny base).

Each feature either works on the cluster or is refused with a 4xx naming why; nothing may 500.
Works: `n` > 1 (indexed choices, one usage), structured output (`response_format` json_schema:
the tiny base writes noise, so valid JSON is the grammar's doing on the replica), a forced tool
call, `cache_salt`, the legacy `/v1/completions`, `/metrics` (admin key). Refused: the files and
fine-tuning routes (400 `jobs_not_configured`: the cluster's store has no local folder to keep
the jobs database beside; `--jobs-dir` names one the trainer sidecar shares).
"""

from __future__ import annotations

import json

from tests.cluster.conftest import ADMIN_KEY

QUESTION = [{"role": "user", "content": "Describe a thing as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["a", "b", "c"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["kind", "n"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def _base(served) -> str:
    return served.openai().models.list().data[0].id


def test_n_choices_come_back_indexed_with_the_prompt_counted_once(ray_served):
    client = ray_served.openai()
    base = _base(ray_served)
    completion = client.chat.completions.create(
        model=base, messages=QUESTION, n=2, max_tokens=4, temperature=1.0, seed=7, extra_body={"min_tokens": 4}
    )
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    single = client.chat.completions.create(model=base, messages=QUESTION, max_tokens=1)
    assert completion.usage.prompt_tokens == single.usage.prompt_tokens  # counted once, not per choice
    assert completion.usage.completion_tokens == 8


def test_structured_output_and_a_forced_tool_call_run_on_the_replicas(ray_served):
    client = ray_served.openai()
    base = _base(ray_served)
    formatted = client.chat.completions.create(
        model=base,
        messages=QUESTION,
        max_tokens=60,
        temperature=1.0,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "strict": True, "schema": SCHEMA}},
    )
    value = json.loads(formatted.choices[0].message.content)
    assert value["kind"] in ("a", "b", "c") and 0 <= value["n"] <= 9 and set(value) == {"kind", "n"}
    called = client.chat.completions.create(
        model=base,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=40,
        temperature=1.0,
        seed=1,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")


def test_legacy_completions_and_cache_salt(ray_served):
    client = ray_served.openai()
    base = _base(ray_served)
    legacy = client.completions.create(model=base, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert legacy.choices[0].text is not None and legacy.usage.completion_tokens >= 1
    for _ in range(2):
        salted = client.chat.completions.create(
            model=base, messages=QUESTION, max_tokens=2, temperature=0, extra_body={"cache_salt": "s1"}
        )
        assert salted.usage.completion_tokens >= 1
    with ray_served.client() as http:
        bad = http.post(
            "/v1/chat/completions",
            json={"model": base, "messages": QUESTION, "max_tokens": 2, "cache_salt": "x" * 10_000},
        )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt", bad.text


def test_metrics_answer_the_admin_with_the_replicas_summed(ray_served):
    with ray_served.client() as http:
        assert http.get("/metrics").status_code in (401, 403)  # a tenant's key is no admin key
        metrics = http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert metrics.status_code == 200, metrics.text
    assert "loraswap_" in metrics.text


def test_files_and_fine_tuning_are_refused_by_name_without_a_jobs_dir(ray_served):
    with ray_served.client() as http:
        uploaded = http.post("/v1/files", files={"file": ("d.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
        listed = http.get("/v1/fine_tuning/jobs")
    for response in (uploaded, listed):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "jobs_not_configured" and "--jobs-dir" in error["message"]

"""Property-based API fuzz (schemathesis) against the live server: no 5xx, and the server lives.

Every operation of the OpenAPI schema, made precise by `fuzz_schema.precise_schema` (typed
messages, real model and adapter names), gets `LORASWAP_FUZZ_EXAMPLES` generated cases (20 in
`make test`, 150 under `make fuzz`), sent as tenant carol. A 5xx, an SSE error event of type
`server_error` (a 500 in disguise) or a body that leaks a path is recorded, not raised, so
Hypothesis does not spend the run shrinking; the test fails at the end with every finding and
prints the status histogram per operation. The fuzz tenant's adapters are re-created whenever a
case deletes them, so later cases still reach the engine.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict

import httpx
import pytest

from tests.adversarial.clients import headers, upload
from tests.adversarial.fuzz_schema import FUZZ_ADAPTERS, precise_schema, settle_case
from tests.adversarial.hostile_adapters import valid_adapter

TENANT = "carol"
EXAMPLES = int(os.environ.get("LORASWAP_FUZZ_EXAMPLES", "20"))
_SERVER_ERROR_EVENT = re.compile(r'^data: \{"error".*"type": ?"server_error"', re.MULTILINE)
_LEAK = re.compile(r"(/tmp/|/home/|/root/|/work/|site-packages|Traceback|[A-Za-z]+Error\()")


def _ensure_adapters(adv) -> None:
    with httpx.Client(base_url=adv.url, headers=headers(TENANT), timeout=60) as http:
        for index, name in enumerate(FUZZ_ADAPTERS):
            if http.get(f"/v1/adapters/{name}").status_code == 404:
                response = upload(adv.url, TENANT, name, valid_adapter(adv.base_info, seed=900 + index))
                assert response.status_code in (200, 201), response.text


def test_schemathesis_finds_no_5xx(alive, capsys):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    adv = alive
    _ensure_adapters(adv)
    raw = httpx.get(f"{adv.url}/openapi.json", headers=headers(TENANT), timeout=30).json()
    schema = schemathesis.openapi.from_dict(precise_schema(raw, adv.base_id, max_tokens=24))
    auth = headers(TENANT)
    histogram: dict[str, Counter] = defaultdict(Counter)
    findings: list[str] = []

    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=EXAMPLES <= 50,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case):
            settle_case(case)
            response = case.call(base_url=adv.url, headers=auth, timeout=120)
            histogram[label][response.status_code] += 1  # noqa: B023 (run() is called in this iteration)
            text = response.text
            if os.environ.get("LORASWAP_FUZZ_DEBUG") and response.status_code == 400:
                print(label, text[:200])  # noqa: B023 (run() is called in this iteration)
            if response.status_code >= 500 or _SERVER_ERROR_EVENT.search(text):
                findings.append(
                    f"{label} -> {response.status_code}: body={str(case.body)[:300]} "  # noqa: B023 (run() is called in this iteration)
                    f"query={case.query} path={case.path_parameters} :: {text[:300]}"
                )
            elif response.status_code >= 400 and _LEAK.search(text):
                findings.append(f"{label} -> {response.status_code} leaks internals: {text[:300]}")  # noqa: B023 (run() is called in this iteration)
            if operation.method.upper() == "DELETE" and response.status_code < 300:  # noqa: B023 (run() is called in this iteration)
                _ensure_adapters(adv)

        run()

    total = sum(sum(c.values()) for c in histogram.values())
    with capsys.disabled():
        print(f"\nschemathesis: {total} cases over {len(histogram)} operations, {len(findings)} findings")
        for label in sorted(histogram):
            counts = ", ".join(f"{status}x{n}" for status, n in sorted(histogram[label].items()))
            print(f"  {label:<36} {counts}")
        for finding in findings[:10]:
            print(f"  finding: {finding[:400]}")
    assert adv.server.alive(), "the server died under the fuzz"
    assert not findings, f"{len(findings)} cases answered 5xx or leaked internals:\n" + "\n".join(findings[:20])

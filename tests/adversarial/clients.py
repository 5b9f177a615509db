"""What a tenant does over HTTP, and what the suite checks about every answer.

- `greedy_run` runs one greedy chat and returns the generated token ids with their logprobs and
  runner-ups, read from the logprobs (`return_tokens_as_token_ids`), so comparisons are of ids,
  not text.
- `Victims` runs another tenant's greedy streams in threads while a test attacks; `.check()`
  asserts each finished with the tokens of a solo run on the same server (`assert_same_as_solo`).
- Why "the same" allows one thing: float32 GEMMs on a CPU round differently at different batch
  sizes (MKL takes other kernels for a few rows), so a request decoded beside others sees logits
  that differ from its solo run's by about 1e-6. That is noise, not interference; it changes a
  greedy token only where the solo run's two best tokens were within a hair of each other. The
  comparison therefore accepts a branch to the solo run's runner-up at such a near-tie (and stops
  comparing there: the contexts differ from then on), and holds every earlier token's logprob to
  the solo run's within `LOGPROB_NOISE`, which catches small contamination that exact token
  equality would miss.
- `assert_envelope` checks OpenAI's error envelope (status, code, param) and that no body names a
  filesystem path or an exception repr.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.adversarial.server_process import ADMIN_KEY, TENANT_KEYS

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
VICTIM_TOKENS = 160  # long enough (about a second alone) that the attack lands mid-stream
# The solo run's lead of its best token over the second, in nats, under which a concurrent run may
# take the second: batch-size rounding moved logprobs by at most 1.7e-6 in 12 rounds of 2-5
# concurrent streams, and the victims' references have leads as small as 6.6e-5 (carol-0, token
# 103), which CI once saw flip.
NEAR_TIE = 1e-2
LOGPROB_NOISE = 1e-3  # the most a compared token's logprob may move from the solo run's
# Things an error body must never carry: absolute paths under usual roots, and Python reprs.
_LEAK = re.compile(
    r"(/tmp/|/home/|/root/|/work/|/var/|/usr/|site-packages|\.venv|Traceback|File \"|"
    r"[A-Za-z]+Error\(|[A-Za-z]:\\\\)"
)


def headers(tenant: str | None) -> dict:
    return {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"} if tenant else {}


def client(url: str, tenant: str | None, timeout: float = 120) -> httpx.Client:
    return httpx.Client(base_url=url, headers=headers(tenant), timeout=timeout)


def chat_body(model: str, max_tokens: int = VICTIM_TOKENS, stream: bool = True, **extra) -> dict:
    body = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,  # the runner-up and its gap, for `assert_same_as_solo`
        "return_tokens_as_token_ids": True,
        "stream": stream,
    }
    body.update(extra)
    return body


@dataclass
class StreamResult:
    status: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # each generated token's
    runner_ups: list[int | None] = field(default_factory=list)  # the second-best token at each position
    leads: list[float] = field(default_factory=list)  # best minus second-best logprob, in nats
    error: dict | None = None  # the SSE error event, or the plain error envelope
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`
    raw: str = ""


def _token_id(entry: dict) -> int:
    return int(entry["token"].removeprefix("token_id:"))


def _read_logprobs(result: StreamResult, logprobs: dict | None) -> None:
    """Append one choice's logprobs content (tokens, their logprobs, runner-ups, leads) to result."""
    for entry in (logprobs or {}).get("content") or []:
        result.tokens.append(_token_id(entry))
        result.logprobs.append(float(entry["logprob"]))
        top = entry.get("top_logprobs") or []
        second = top[1] if len(top) > 1 else None
        result.runner_ups.append(_token_id(second) if second else None)
        result.leads.append(float(top[0]["logprob"]) - float(second["logprob"]) if second else float("inf"))


def stream_chat(
    url: str, tenant: str, body: dict, started: threading.Event | None = None, timeout: float = 300
) -> StreamResult:
    """POST a streamed chat and collect token ids, the finish reason or the error event."""
    with client(url, tenant, timeout) as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        result = StreamResult(response.status_code)
        if response.status_code != 200:
            result.raw = response.read().decode(errors="replace")
            result.error = _json_or_none(result.raw)
            return result
        for line in response.iter_lines():
            result.raw += line + "\n"
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                result.done = True
                break
            event = json.loads(data)
            if "error" in event:
                result.error = event
                continue
            for choice in event.get("choices") or []:
                _read_logprobs(result, choice.get("logprobs"))
                result.finish_reason = choice.get("finish_reason") or result.finish_reason
            if started is not None and result.tokens:
                started.set()
        return result


def plain_chat(url: str, tenant: str, body: dict, timeout: float = 300) -> StreamResult:
    with client(url, tenant, timeout) as http:
        response = http.post("/v1/chat/completions", json={**body, "stream": False})
    result = StreamResult(response.status_code, raw=response.text)
    payload = _json_or_none(response.text) or {}
    if response.status_code != 200:
        result.error = payload
        return result
    choice = payload["choices"][0]
    _read_logprobs(result, choice.get("logprobs"))
    result.finish_reason, result.done = choice["finish_reason"], True
    return result


def greedy_run(url: str, tenant: str, model: str, max_tokens: int = VICTIM_TOKENS) -> StreamResult:
    """A solo greedy run (the reference a concurrent run must match, see `assert_same_as_solo`)."""
    result = stream_chat(url, tenant, chat_body(model, max_tokens))
    assert result.status == 200 and result.error is None and result.done, result.raw[-2000:]
    assert len(result.tokens) == max_tokens
    return result


def assert_same_as_solo(result: StreamResult, solo: StreamResult, label: str) -> None:
    """`result` decoded what its solo run did: the same tokens with the same logprobs (within
    LOGPROB_NOISE), except that at a near-tie of the solo run (lead < NEAR_TIE) it may take the
    runner-up, past which the runs are not compared (see the module docstring)."""
    assert len(result.tokens) == len(solo.tokens), f"{label}: {len(result.tokens)} tokens, solo {len(solo.tokens)}"
    for i, (want, got) in enumerate(zip(solo.tokens, result.tokens)):
        if got != want:
            assert solo.leads[i] < NEAR_TIE and got == solo.runner_ups[i], (
                f"{label}: token {i} is {got} where the solo run chose {want} by {solo.leads[i]:.3g} nats "
                f"(runner-up {solo.runner_ups[i]}): tokens differ from the solo run"
            )
            return
        moved = abs(result.logprobs[i] - solo.logprobs[i])
        assert moved <= LOGPROB_NOISE, f"{label}: token {i}'s logprob moved {moved:.3g} from the solo run's"


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class Victims:
    """Another tenant's greedy streams, running in threads while a test attacks.

    `with Victims(server, refs, [("bob", "bob-a"), ("bob", base)]) as victims: <attack>` starts
    the streams and waits until each has produced a token (so the attack overlaps them); on exit
    it joins them. `victims.check()` asserts every stream ended normally with the solo tokens.
    """

    def __init__(self, url: str, references: "References", who: list[tuple[str, str]], max_tokens: int = VICTIM_TOKENS):
        self.url, self.references, self.who, self.max_tokens = url, references, who, max_tokens
        self.results: list[StreamResult | BaseException | None] = [None] * len(who)
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Victims":
        for tenant, model in self.who:
            self.references.get(tenant, model, self.max_tokens)  # solo first, before any concurrency
        events = []
        for index, (tenant, model) in enumerate(self.who):
            started = threading.Event()
            events.append(started)
            thread = threading.Thread(target=self._run, args=(index, tenant, model, started), daemon=True)
            thread.start()
            self._threads.append(thread)
        for started, thread in zip(events, self._threads):
            while not started.wait(0.05) and thread.is_alive():
                pass
        return self

    def _run(self, index, tenant, model, started):
        try:
            self.results[index] = stream_chat(self.url, tenant, chat_body(model, self.max_tokens), started)
        except BaseException as exc:  # noqa: BLE001 - reported by check()
            self.results[index] = exc
        finally:
            started.set()

    def __exit__(self, *exc) -> None:
        for thread in self._threads:
            thread.join(timeout=300)

    def check(self) -> None:
        for (tenant, model), result in zip(self.who, self.results):
            assert isinstance(result, StreamResult), f"{tenant}/{model}: the victim's stream failed: {result!r}"
            assert result.status == 200 and result.error is None and result.done, (
                f"{tenant}/{model}: the victim's stream was hurt: {result.status} {result.raw[-600:]}"
            )
            assert_same_as_solo(result, self.references.get(tenant, model, self.max_tokens), f"{tenant}/{model}")


class References:
    """Solo greedy runs per (tenant, model, max_tokens), computed once on the live server."""

    def __init__(self, url: str):
        self.url = url
        self._cache: dict[tuple, StreamResult] = {}
        self._lock = threading.Lock()

    def get(self, tenant: str, model: str, max_tokens: int = VICTIM_TOKENS) -> StreamResult:
        key = (tenant, model, max_tokens)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = greedy_run(self.url, tenant, model, max_tokens)
            return self._cache[key]


def assert_clean(text: str) -> None:
    """No filesystem path, traceback or exception repr in what a client sees."""
    match = _LEAK.search(text or "")
    assert match is None, f"a response leaks server internals ({match.group(0)!r}): {text[:500]}"


def assert_envelope(
    response_or_result, statuses, code: str | tuple | None = None, param: str | tuple | None = None
) -> dict:
    """Assert an OpenAI error envelope with a status in `statuses` (and `code`/`param` if given)."""
    if isinstance(response_or_result, httpx.Response):
        status, text = response_or_result.status_code, response_or_result.text
    else:
        status, text = response_or_result.status, response_or_result.raw
    statuses = (statuses,) if isinstance(statuses, int) else tuple(statuses)
    assert status in statuses, f"expected {statuses}, got {status}: {text[:600]}"
    payload = json.loads(text)
    error = payload.get("error")
    assert isinstance(error, dict) and set(error) >= {"message", "type", "param", "code"}, text[:600]
    assert error["message"], "an error needs a message that names the problem"
    if code is not None:
        codes = (code,) if isinstance(code, str) else tuple(code)
        assert error["code"] in codes, f"code {error['code']!r}, expected {codes}: {text[:600]}"
    if param is not None:
        params = (param,) if isinstance(param, str) else tuple(param)
        assert error["param"] in params, f"param {error['param']!r}, expected {params}: {text[:600]}"
    assert_clean(text)
    return error


def upload(url: str, tenant: str, name: str, files: dict[str, bytes], timeout: float = 300) -> httpx.Response:
    """POST /v1/adapters with `files` (file name -> bytes) as multipart."""
    parts = [("files", (fname, data, "application/octet-stream")) for fname, data in files.items()]
    with client(url, tenant, timeout) as http:
        return http.post("/v1/adapters", data={"name": name}, files=parts)


def read_dir(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def read_metrics(url: str) -> dict[str, float]:
    """The admin-only /metrics as {metric name: value summed over its labels}."""
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    response.raise_for_status()
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$", line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(3))
    return values

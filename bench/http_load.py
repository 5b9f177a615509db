"""The HTTP load generator: closed-loop waves of chat completions against a running server.

`run_wave` sends `requests` chat completions with at most `concurrency` in flight (each worker
sends its next request as soon as its previous one ends), greedy, exactly `new_tokens` tokens
each (`min_tokens = max_tokens`, so EOS stays masked until the end). Streaming requests read the
SSE stream to its `[DONE]`; plain ones read the JSON body. Throughput is completion tokens (the
server's own `usage`) over the wall time from the first send to the last byte. It knows nothing
about the server's internals; `upload_adapter` uses the public `/v1/adapters` route.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class WaveResult:
    """One wave: how many tokens in how long, and each request's end-to-end seconds."""

    tokens: int
    seconds: float
    latencies: tuple[float, ...]
    texts: tuple[str, ...]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def chat_body(model: str, question: str, new_tokens: int, stream: bool) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": new_tokens,
        "min_tokens": new_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(client: httpx.AsyncClient, body: dict) -> tuple[int, str]:
    """(completion tokens, text) of one request; raises on any HTTP or stream error."""
    if not body["stream"]:
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        data = response.json()
        return data["usage"]["completion_tokens"], data["choices"][0]["message"]["content"]
    tokens, parts = 0, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream ended with an error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", ()):
                parts.append(choice.get("delta", {}).get("content") or "")
    return tokens, "".join(parts)


async def run_wave(url: str, bodies: list[dict], concurrency: int, timeout: float = 600) -> WaveResult:
    """Send `bodies` with at most `concurrency` in flight; results in the order of `bodies`."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[tuple[int, str, float] | None] = [None] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(bodies)):
        queue.put_nowait(index)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            sent = time.perf_counter()
            tokens, text = await _one(client, bodies[index])
            results[index] = (tokens, text, time.perf_counter() - sent)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(min(concurrency, len(bodies)))))
        seconds = time.perf_counter() - start
    done = [r for r in results if r is not None]
    return WaveResult(
        tokens=sum(r[0] for r in done),
        seconds=seconds,
        latencies=tuple(r[2] for r in done),
        texts=tuple(r[1] for r in done),
    )


def upload_adapter(url: str, name: str, directory: Path, timeout: float = 300) -> dict:
    """Upload a PEFT adapter directory as `name` through `POST /v1/adapters`; returns its card."""
    files = [
        ("files", (path.name, path.read_bytes(), "application/octet-stream"))
        for path in sorted(directory.iterdir())
        if path.name in ("adapter_config.json", "adapter_model.safetensors")
    ]
    response = httpx.post(f"{url}/v1/adapters", data={"name": name}, files=files, timeout=timeout)
    if response.status_code >= 400:
        raise RuntimeError(f"upload of {name} failed: {response.status_code} {response.text[:300]}")
    return response.json()


def engine_counters(url: str) -> dict[str, float]:
    """The engine's step and token counters from `/metrics` (open on a server without keys)."""
    wanted = ("loraswap_engine_steps_total", "loraswap_engine_generated_tokens_total")
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name.removeprefix("loraswap_engine_").removesuffix("_total")] = float(value)
    return found

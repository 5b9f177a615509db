"""Soak / chaos run against a real `loraswap serve` on the tiny base (loopback only, bounded in time).

    python -m tests.adversarial.soak [--duration 180] [--workers 6] [--seed 0]   (or `make soak`)

Three tenants run concurrent greedy streams on their adapters and the base, drop connections at
random mid-stream, send hostile requests (out-of-range sampling values, oversized stop lists),
pin and unpin, and upload, delete and re-upload a churning adapter under traffic. Every
non-hostile request that is answered must carry exactly the tokens of a solo run made at the
start (a churned adapter may answer 404 between its delete and re-upload; that is counted, not
an error). At the end, once idle, it reads the admin-only /metrics and checks: nothing running
or waiting, zero KV blocks used, zero adapter pins; and the server's RSS at the end against the
RSS after warm-up. Prints a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.adversarial.clients import (
    assert_clean,
    assert_same_as_solo,
    chat_body,
    client,
    read_metrics,
    stream_chat,
    upload,
)
from tests.adversarial.server_process import ServerProcess

TENANTS = ("alice", "bob", "carol")
MAX_TOKENS = 24
RSS_SLACK = 64 << 20  # allocator noise over a few minutes; a per-request leak grows far past it
HOSTILE = (
    {"temperature": 1e-300},
    {"seed": 2**64},
    {"top_k": 2**63},
    {"stop": ["s"] * 5000},
    {"top_p": 0},
    {"max_tokens": 10**9},
)


class Soak:
    def __init__(self, server: ServerProcess, base_info, base_id: str, seed: int):
        from tests.adversarial.hostile_adapters import valid_adapter

        self.server, self.url, self.base_id = server, server.url, base_id
        self.rng = random.Random(seed)
        self.files = {t: valid_adapter(base_info, seed=1000 + i) for i, t in enumerate(TENANTS)}
        self.churn_files = {t: valid_adapter(base_info, seed=2000 + i) for i, t in enumerate(TENANTS)}
        self.expected: dict[tuple[str, str], list[int]] = {}
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.churn_locks = {t: threading.Lock() for t in TENANTS}

    # -- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        for tenant in TENANTS:
            for name, files in (
                (f"{tenant}-steady", self.files[tenant]),
                (f"{tenant}-churn", self.churn_files[tenant]),
            ):
                response = upload(self.url, tenant, name, files)
                assert response.status_code == 201, response.text
        for tenant in TENANTS:  # solo references, one at a time on an idle server
            for model in (f"{tenant}-steady", f"{tenant}-churn", self.base_id):
                result = stream_chat(self.url, tenant, chat_body(model, MAX_TOKENS))
                assert result.status == 200 and result.done, result.raw[-500:]
                self.expected[(tenant, model)] = result

    # -- one action of one worker --------------------------------------------------------------
    def act(self, tenant: str, rng: random.Random) -> None:
        roll = rng.random()
        if roll < 0.45:
            self.generate(tenant, rng.choice([f"{tenant}-steady", self.base_id, f"{tenant}-churn"]))
        elif roll < 0.65:
            self.disconnect(tenant, rng.choice([f"{tenant}-steady", self.base_id]), rng)
        elif roll < 0.75:
            self.hostile(tenant, rng)
        elif roll < 0.85:
            self.pin_cycle(tenant)
        else:
            self.churn(tenant, rng)

    def generate(self, tenant: str, model: str) -> None:
        result = stream_chat(self.url, tenant, chat_body(model, MAX_TOKENS))
        if result.status == 404 and model.endswith("-churn"):
            self.count("churn_404")
            return
        if result.status != 200 or result.error is not None or not result.done:
            self.fail(f"{tenant}/{model}: {result.status} {result.raw[-300:]}")
        else:
            try:
                assert_same_as_solo(result, self.expected[(tenant, model)], f"{tenant}/{model}")
            except AssertionError as error:
                self.fail(str(error))
            else:
                self.count("correct")

    def disconnect(self, tenant: str, model: str, rng: random.Random) -> None:
        keep = rng.randint(1, MAX_TOKENS - 2)
        with (
            client(self.url, tenant) as http,
            http.stream("POST", "/v1/chat/completions", json=chat_body(model, MAX_TOKENS)) as response,
        ):
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data: ")
                if seen > keep:
                    break
        self.count("disconnects")

    def hostile(self, tenant: str, rng: random.Random) -> None:
        fields = rng.choice(HOSTILE)
        with client(self.url, tenant) as http:
            response = http.post(
                "/v1/chat/completions", json={**chat_body(f"{tenant}-steady", MAX_TOKENS, False), **fields}
            )
        self.count(f"hostile_{response.status_code}")
        if response.status_code >= 500:
            self.fail(f"hostile {sorted(fields)}: {response.status_code} {response.text[:200]}")
        try:
            assert_clean(response.text)
        except AssertionError as exc:
            self.fail(str(exc))

    def pin_cycle(self, tenant: str) -> None:
        with client(self.url, tenant) as http:
            for action in ("pin", "unpin"):
                response = http.post(f"/v1/adapters/{tenant}-steady/{action}")
                if response.status_code != 200:
                    self.fail(f"{action}: {response.status_code} {response.text[:200]}")
        self.count("pin_cycles")

    def churn(self, tenant: str, rng: random.Random) -> None:
        """Delete and re-upload the churning adapter (the same bytes, so its reference holds)."""
        name = f"{tenant}-churn"
        with self.churn_locks[tenant], client(self.url, tenant) as http:
            deleted = http.delete(f"/v1/adapters/{name}")
            if deleted.status_code not in (200, 404):
                self.fail(f"delete: {deleted.status_code} {deleted.text[:200]}")
            for _ in range(50):  # 409 while the delete waits for requests still using it
                response = upload(self.url, tenant, name, self.churn_files[tenant])
                if response.status_code != 409:
                    break
                time.sleep(0.1)
            if response.status_code not in (200, 201):
                self.fail(f"re-upload: {response.status_code} {response.text[:200]}")
        self.count("churns")

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1
            self.counts["requests"] += key != "churns" and key != "pin_cycles"

    def fail(self, message: str) -> None:
        with self.lock:
            self.counts["requests"] += 1
            self.failures.append(message)

    # -- the run -----------------------------------------------------------------------------
    def run(self, duration: float, workers: int) -> dict:
        warm_until = time.monotonic() + duration * 0.2
        stop_at = time.monotonic() + duration
        warm_rss: list[int] = []

        def worker(index: int):
            rng = random.Random(self.rng.random())
            tenant = TENANTS[index % len(TENANTS)]
            while time.monotonic() < stop_at:
                try:
                    self.act(tenant, rng)
                except httpx.HTTPError as exc:
                    self.fail(f"{tenant}: transport error {type(exc).__name__}")

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(workers)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        while time.monotonic() < warm_until:
            time.sleep(0.5)
        warm_rss.append(self.server.rss_bytes())
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        return {"duration_s": elapsed, "rss_warm": warm_rss[0], **self.final_checks()}

    def final_checks(self) -> dict:
        """Idle the server, then read what leaked from the admin-only /metrics."""
        values: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            values = read_metrics(self.url)
            if not values.get("loraswap_engine_running") and not values.get("loraswap_engine_waiting"):
                break
            time.sleep(0.5)
        return {"rss_end": self.server.rss_bytes(), "metrics": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of chaos (default 180)")
    parser.add_argument("--workers", type=int, default=6, help="concurrent client threads (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from adapters.base import BaseInfo
    from tests.tiny import build_tiny_base

    with tempfile.TemporaryDirectory(prefix="loraswap-soak-") as tmp:
        root = Path(tmp)
        base_dir = build_tiny_base(root / "base")
        server = ServerProcess(base_dir, root / "store", root / "server.log")
        with server:
            base_id = httpx.get(
                f"{server.url}/v1/models", headers={"Authorization": "Bearer sk-alice-adv-0123456789"}, timeout=30
            ).json()["data"][0]["id"]
            soak = Soak(server, BaseInfo.from_dir(base_dir), base_id, args.seed)
            soak.setup()
            outcome = soak.run(args.duration, args.workers)
            alive = server.alive()
            log_tail = server.log_tail(30)
        return report(soak, outcome, alive, log_tail)


def report(soak: Soak, outcome: dict, alive: bool, log_tail: str) -> int:
    metrics = outcome["metrics"]
    leaks = {
        "running": metrics.get("loraswap_engine_running"),
        "waiting": metrics.get("loraswap_engine_waiting"),
        "kv_blocks_used": metrics.get("loraswap_engine_kv_blocks_used"),
        "pinned_adapters": metrics.get("loraswap_engine_pinned_adapters"),
    }
    growth = outcome["rss_end"] - outcome["rss_warm"]
    rss_ok = growth <= max(RSS_SLACK, 0.15 * outcome["rss_warm"])
    counts = soak.counts
    print("soak summary")
    print(f"  duration        {outcome['duration_s']:.0f} s")
    print(
        f"  requests        {counts['requests']} ({counts['correct']} correct greedy, "
        f"{counts['disconnects']} disconnects, {counts['churn_404']} churn 404s, "
        f"hostile: {', '.join(f'{k[8:]}x{v}' for k, v in sorted(counts.items()) if k.startswith('hostile_')) or '0'})"
    )
    print(f"  churns          {counts['churns']} delete+re-upload, {counts['pin_cycles']} pin/unpin cycles")
    print("  leaks           " + ", ".join(f"{k}={v if v is not None else 'not exposed'}" for k, v in leaks.items()))
    print(
        f"  rss             warm {outcome['rss_warm'] / 2**20:.1f} MiB -> end {outcome['rss_end'] / 2**20:.1f} MiB "
        f"({growth / 2**20:+.1f} MiB, {'flat' if rss_ok else 'GROWING'})"
    )
    print(f"  failures        {len(soak.failures)}")
    for failure in soak.failures[:20]:
        print(f"    - {failure[:300]!r}")
    problems = []
    if soak.failures:
        problems.append(f"{len(soak.failures)} failed requests")
    if any(v is None or v != 0 for v in leaks.values()):
        problems.append(f"leaks or unexposed counters: {leaks}")
    if not rss_ok:
        problems.append("RSS grew")
    if not alive:
        problems.append("the server died")
        print(log_tail)
    print("  result          " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

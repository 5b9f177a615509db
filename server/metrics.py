"""Prometheus metrics, one `CollectorRegistry` per app (no global state, so tests build many apps).

Counted by the HTTP layer as requests run: requests and tokens per tenant and kind of model
(`base` or `adapter`), time to first token, inter-token latency. Read from the engine at scrape
time (`EngineCollector`): queue depth, running requests, resident adapters per tier, slot loads
and evictions, how many adapters are folded or pinned.

No label ever carries an adapter's name or id: names are tenants' own data, and ids are content
hashes another tenant could match against its own uploads. Tenant names appear only as labels of
counts, and `/metrics` answers only to the admin key (`server.edge`).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The HTTP layer's own counters and histograms, registered in a fresh registry."""

    def __init__(self, engine_stats: Callable[[], EngineStats] | None = None):
        self.registry = CollectorRegistry()
        labels = ("tenant", "kind")
        self.requests = Counter(
            "loraswap_requests", "Chat completion requests by outcome", labels + ("status",), registry=self.registry
        )
        self.prompt_tokens = Counter("loraswap_prompt_tokens", "Prompt tokens", labels, registry=self.registry)
        self.generation_tokens = Counter(
            "loraswap_generation_tokens", "Generated tokens", labels, registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "loraswap_time_to_first_token_seconds",
            "Time to first token",
            ("kind",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "loraswap_inter_token_latency_seconds",
            "Time between tokens of one request",
            ("kind",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.uploads = Counter(
            "loraswap_adapter_uploads", "Adapter uploads by outcome", ("status",), registry=self.registry
        )
        if engine_stats is not None:
            self.registry.register(EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Reads `engine.stats()` at scrape time and exposes it as gauges and counters."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        for key, value, help_ in (
            ("waiting", stats.waiting, "Requests waiting in the engine queue"),
            ("running", stats.running, "Requests running in the engine batch"),
            ("kv_blocks_used", stats.kv_blocks_used, "KV cache blocks in use (0 when idle: the soak's leak check)"),
            ("kv_blocks_cached", stats.kv_blocks_cached, "KV blocks registered in the prefix cache"),
            (
                "prefix_cache_hit_rate",
                stats.prefix_cache_hit_rate,
                "Prompt tokens found in the prefix cache / looked up",
            ),
        ):
            gauge = GaugeMetricFamily(f"loraswap_engine_{key}", help_)
            gauge.add_metric([], float(value))
            yield gauge
        for key, value, help_ in (
            ("slot_loads", stats.slot_loads, "Adapter loads into device slots"),
            ("slot_evictions", stats.slot_evictions, "Adapter evictions from device slots"),
            ("prefix_cache_queries", stats.prefix_cache_queries, "Prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hits", stats.prefix_cache_hits, "Prompt tokens found in the prefix cache"),
        ):
            counter = CounterMetricFamily(f"loraswap_engine_{key}", help_)
            counter.add_metric([], float(value))
            yield counter
        resident = GaugeMetricFamily("loraswap_resident_adapters", "Adapters per residency tier", labels=["tier"])
        tiers = {"device": 0, "host": 0, "loading": 0}
        folded = pinned = 0
        for where in stats.residency().values():
            if where.tier in tiers:
                tiers[where.tier] += 1
            folded += where.folded
            pinned += where.pinned
        for tier, count in tiers.items():
            resident.add_metric([tier], float(count))
        yield resident
        yield GaugeMetricFamily("loraswap_adapters_folded", "Adapters folded into dense weights", value=folded)
        # A count, never per adapter; the adversarial soak reads this name.
        yield GaugeMetricFamily(
            "loraswap_engine_pinned_adapters", "Adapters pinned by any tenant (a count)", value=pinned
        )

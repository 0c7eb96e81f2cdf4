"""Prometheus metrics: the engine's gauges and counters, read from the engine thread's last snapshot at scrape
time, plus per-request latency observed by the front ends."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jlora.serve.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (snapshot key, metric name, help) of the engine's gauges and counters.
GAUGES = (
    ("waiting", "jlora_queue_depth", "Requests waiting to be scheduled."),
    ("running", "jlora_running_sequences", "Sequences in the running batch."),
    ("in_flight", "jlora_requests_in_flight", "Requests accepted and not yet finished."),
    ("free_pages", "jlora_kv_free_pages", "KV-cache pages no sequence holds (free, or cached and reusable)."),
    ("pages_used", "jlora_kv_pages_used", "KV-cache pages held by sequences."),
    ("pages_total", "jlora_kv_pages_total", "KV-cache pages in the pool."),
    ("sequences", "jlora_engine_sequences", "Requests the engine holds (waiting, running or finishing)."),
    ("adapter_refs", "jlora_adapter_references", "Adapter references held by requests."),
    ("tokens_per_second", "jlora_generation_tokens_per_second", "Generated tokens per second, recent window."),
    ("adapters_registered", "jlora_adapters_registered", "Adapters registered."),
    ("prefix_cache_hit_rate", "jlora_prefix_cache_hit_rate",
     "Prompt tokens whose KV came from the prefix cache, over all prompt tokens admitted, since start."),
    ("prefix_cache_pages", "jlora_prefix_cache_pages", "KV pages in the prefix cache (held or reusable)."),
)
COUNTERS = (
    ("tokens_generated", "jlora_generation_tokens", "Tokens generated."),
    ("steps", "jlora_engine_steps", "Engine steps run."),
    ("preemptions", "jlora_preemptions", "Sequences preempted for lack of KV pages."),
    ("device_state_resets", "jlora_device_state_resets",
     "Failed steps that took the KV cache with them (reallocated; the other requests recomputed)."),
    ("compilations", "jlora_compilations", "XLA compilations in this process."),
    ("adapter_device_hits", "jlora_adapter_device_cache_hits", "Adapter lookups found in a device slot."),
    ("adapter_device_misses", "jlora_adapter_device_cache_misses", "Adapter lookups that had to write a slot."),
    ("adapter_host_hits", "jlora_adapter_host_cache_hits", "Adapter loads served from the host cache."),
    ("adapter_host_misses", "jlora_adapter_host_cache_misses", "Adapter loads read from disk."),
    ("prefix_cache_query_tokens", "jlora_prefix_cache_query_tokens", "Prompt tokens admitted (recomputations too)."),
    ("prefix_cache_hit_tokens", "jlora_prefix_cache_hit_tokens", "Admitted tokens whose KV the prefix cache held."),
    ("prefix_cache_evictions", "jlora_prefix_cache_evictions", "Cached KV pages evicted for other tokens."),
)


class EngineCollector:
    """Reads `AsyncEngine.stats()` (never blocks the engine) whenever Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, name, doc in GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))
        for key, name, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        finished = CounterMetricFamily("jlora_requests_finished", "Requests finished, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(stats.get("finished", {}).items()):
            finished.add_metric([str(reason)], n)
        yield finished


class ServerMetrics:
    """One registry per server (so that tests can run several), with the engine collector and latencies."""

    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.latency = Histogram("jlora_request_latency_seconds", "Request latency, accepted to finished.",
                                 ["api"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one server: request counts and latencies, tokens, engine state.

Each app owns its `CollectorRegistry`, so several servers (tests) can live in one process.
Request metrics are observed as requests run; engine gauges and counters are a snapshot of
the engine's stats taken between two steps when `/metrics` is scraped.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.audit import RequestRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_GENERATION = ("/v1/chat/completions", "/v1/completions")
# How a stream ended where its status, 200 (sent with its first byte), cannot say it.
_STREAM_OUTCOME = {"timeout": "504", "error": "500"}

# engine.stats key -> (metric name, help, gauge or counter)
_ENGINE = {
    "waiting": ("loraplex_num_requests_waiting", "Requests queued for a first step", "gauge"),
    "running": ("loraplex_num_requests_running", "Sequences in the running batch", "gauge"),
    "kv_blocks_used": ("loraplex_kv_cache_blocks_used", "KV-cache blocks in use", "gauge"),
    "kv_blocks_total": ("loraplex_kv_cache_blocks_total", "KV-cache blocks in the pool", "gauge"),
    "prefix_cache_hit_blocks": (
        "loraplex_prefix_cache_hit_blocks",
        "Prompt blocks served from the prefix cache",
        "counter",
    ),
    "prefix_cache_query_blocks": (
        "loraplex_prefix_cache_query_blocks",
        "Prompt blocks looked up in the prefix cache",
        "counter",
    ),
    "preemptions": ("loraplex_preemptions", "Sequences preempted for KV blocks", "counter"),
    "requests_aborted": ("loraplex_requests_aborted", "Requests aborted unfinished", "counter"),
    "adapter_slot_loads": (
        "loraplex_adapter_slot_loads",
        "Adapters copied into a device slot",
        "counter",
    ),
    "adapter_slot_hits": (
        "loraplex_adapter_slot_hits",
        "Admissions whose adapter was already in its device slot",
        "counter",
    ),
    "adapter_slot_evictions": (
        "loraplex_adapter_slot_evictions",
        "Adapters evicted from a device slot",
        "counter",
    ),
    "adapter_host_evictions": (
        "loraplex_adapter_host_evictions",
        "Adapters evicted from host memory",
        "counter",
    ),
}


class _EngineSnapshot:
    """A custom collector over the last stats snapshot (set just before each scrape)."""

    def __init__(self):
        self.stats: dict[str, float] = {}

    def collect(self):
        for key, value in self.stats.items():
            if key not in _ENGINE:
                continue
            name, doc, kind = _ENGINE[key]
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, doc, value=value)


class ServerMetrics:
    def __init__(self):
        # No `_created` series beside each counter and histogram (vLLM drops them too): they
        # double the series to scrape and say only when the server started. Process-wide.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplex_requests", "API requests", ["endpoint", "model", "status"], registry=r
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "From the request's arrival to its first output token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Between two output tokens of one request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loraplex_request_latency_seconds",
            "From arrival to the last byte of generation requests",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "loraplex_completion_tokens", "Tokens generated", ["model"], registry=r
        )
        self.adapter_loads = Counter(
            "loraplex_adapter_loads",
            "Adapters read and installed by the server",
            ["reason"],  # first_use, api, alias_moved
            registry=r,
        )
        self._engine = _EngineSnapshot()
        r.register(self._engine)

    def forget(self, model: str) -> None:
        """Drop an unloaded adapter's series: names loaded and unloaded for weeks would
        otherwise add series without end (and load it again: its counters start at 0)."""
        for metric in (
            self.requests,
            self.ttft,
            self.itl,
            self.e2e,
            self.prompt_tokens,
            self.completion_tokens,
        ):
            metric.remove_by_labels({"model": model})

    def observe(self, record: RequestRecord) -> None:
        """A finished request (the audit record) into the counters and histograms.

        Its model is a label only for generation, which records it once resolved to the
        base or a loaded adapter; the admin routes record the name as sent (for the audit
        line): a load and an unload under each new name would add series without end.
        """
        model = (record.model if record.endpoint in _GENERATION else None) or "none"
        status = str(record.status)
        if record.status == 200:
            status = _STREAM_OUTCOME.get(record.finish_reason, status)
        self.requests.labels(record.endpoint, model, status).inc()
        if record.endpoint not in _GENERATION:
            return
        if status == "200":  # answers given in full: not a stream cut by a timeout or error
            self.e2e.labels(model).observe(record.latency_s)
        if record.first_token_at is not None:
            self.ttft.labels(model).observe(record.first_token_at - record.started)
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.completion_tokens.labels(model).inc(record.completion_tokens)

    def render(self, engine_stats: dict[str, float]) -> bytes:
        self._engine.stats = engine_stats
        return generate_latest(self.registry)

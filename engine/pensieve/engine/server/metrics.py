"""Prometheus metrics of one server (its own CollectorRegistry).

Names are a contract (docs/design.md, "Metrics"; tests/test_design_contract.py
keeps the document and this file in agreement): the router, the operator's
autoscaling rules and the dashboards read them. Engine gauges and counters are
collected at scrape time from the engine thread's latest snapshot
(snapshot.engine_metrics_snapshot); latencies and request outcomes are observed
by the HTTP handlers.

Choices where the contract is silent:
- ``pensieve_gpu_cache_blocks`` / ``pensieve_cpu_cache_blocks``: blocks in use
  (held by running requests or sessions' caches); the capacity is in
  ``pensieve_cache_config_info`` and the ratio in ``*_usage_ratio``.
- ``pensieve_requests_total{status}`` (generation requests, POST): the finish
  reason of requests the engine ran (``stop``, ``length``, ``abort``),
  ``error`` when one failed inside the server or the engine (an HTTP 500, or
  the error event that ends a stream whose 200 was already sent), and the HTTP
  status code (``400``, ``401``, ``404``, ``409``, ``413``, ``429``, ``503``) of
  requests refused before they ran. ``count_outcome`` is the one place that
  picks the label.
- ``pensieve_sessions_active``: sessions the engine knows (cached or not).

vLLM-named aliases (``VLLM_ALIASES``, same values, read at the same scrape) for the
Gateway API Inference Extension's endpoint picker, which scores model servers by the
names of its model-server protocol: queue length, running requests and KV-cache
utilization (a fraction in 0..1, as vLLM reports it despite the ``_perc`` suffix), and
``vllm:cache_config_info{block_size}`` for its prefix-cache scorer. The ``pensieve_*``
names stay the contract; the aliases add no state.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .snapshot import CONTEXT_SOURCES, STEP_PATHS, EngineSnapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# alias -> (contract gauge it repeats, help)
VLLM_ALIASES = {
    "vllm:num_requests_running": ("pensieve_num_requests_running", "Requests in the running batch (vLLM name)"),
    "vllm:num_requests_waiting": ("pensieve_num_requests_waiting", "Requests waiting for admission (vLLM name)"),
    "vllm:num_requests_swapped": ("pensieve_num_requests_swapped", "Requests suspended to the CPU tier (vLLM name)"),
    "vllm:gpu_cache_usage_perc": ("pensieve_gpu_cache_usage_ratio", "GPU KV-cache usage, 0..1 (vLLM name)"),
    "vllm:kv_cache_usage_perc": ("pensieve_gpu_cache_usage_ratio", "GPU KV-cache usage, 0..1 (newer vLLM name)"),
}


def vllm_cache_config_labels(cache_labels: dict[str, str]) -> dict[str, str]:
    """``vllm:cache_config_info`` labels (vLLM's label names) from ours."""
    return {"block_size": cache_labels.get("block_size", ""), "num_gpu_blocks": cache_labels.get("gpu_blocks", ""),
            "num_cpu_blocks": cache_labels.get("cpu_blocks", "")}


class _EngineCollector:
    def __init__(self, get_snapshot):
        self._get = get_snapshot

    def collect(self):
        s: EngineSnapshot = self._get()

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        gauges = {
            "pensieve_num_requests_running": ("Requests in the running batch", s.num_requests_running),
            "pensieve_num_requests_waiting": ("Requests waiting for admission", s.num_requests_waiting),
            "pensieve_num_requests_swapped": ("Requests suspended to the CPU tier", s.num_requests_swapped),
            "pensieve_gpu_cache_usage_ratio": ("Fraction of GPU KV blocks in use", s.gpu_usage_ratio),
            "pensieve_cpu_cache_usage_ratio": ("Fraction of CPU KV blocks in use", s.cpu_usage_ratio),
            "pensieve_gpu_cache_blocks": ("GPU KV blocks in use", s.gpu_blocks_used),
            "pensieve_cpu_cache_blocks": ("CPU KV blocks in use", s.cpu_blocks_used),
            "pensieve_sessions_active": ("Sessions the engine holds", s.sessions_active),
        }
        for name, (doc, v) in gauges.items():
            yield gauge(name, doc, v)
        for alias, (name, doc) in VLLM_ALIASES.items():
            yield gauge(alias, doc, gauges[name][1])

        c = CounterMetricFamily("pensieve_prompt_tokens", "Prompt tokens of served requests")
        c.add_metric([], s.prompt_tokens)
        yield c
        c = CounterMetricFamily("pensieve_generation_tokens", "Generated tokens")
        c.add_metric([], s.generation_tokens)
        yield c
        c = CounterMetricFamily("pensieve_context_tokens", "Where each prompt token's KV came from",
                                labels=["source"])
        for src in CONTEXT_SOURCES:
            c.add_metric([src], s.context_tokens.get(src, 0))
        yield c
        c = CounterMetricFamily("pensieve_swap_bytes", "Bytes copied between the GPU and CPU tiers",
                                labels=["direction"])
        for d in ("in", "out"):
            c.add_metric([d], s.swap_bytes.get(d, 0))
        yield c
        c = CounterMetricFamily("pensieve_swap_out_in_step_bytes",
                                "Of the bytes copied to the CPU tier, those a step's layers waited for")
        c.add_metric([], s.swap_out_in_step_bytes)
        yield c
        c = CounterMetricFamily("pensieve_engine_steps", "Engine steps by how they ran", labels=["path"])
        for path in STEP_PATHS:
            c.add_metric([path], s.step_paths.get(path, 0))
        yield c
        c = CounterMetricFamily("pensieve_evicted_tokens", "Cached tokens evicted from a tier", labels=["tier"])
        for t in ("gpu", "cpu"):
            c.add_metric([t], s.evicted_tokens.get(t, 0))
        yield c


class ServerMetrics:
    def __init__(self, get_snapshot, cache_labels: dict[str, str]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(get_snapshot))
        self.requests = Counter("pensieve_requests", "API requests by outcome", ["status"], registry=self.registry)
        self.ttft = Histogram("pensieve_time_to_first_token_seconds", "Arrival to first streamed token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("pensieve_inter_token_latency_seconds", "Time between successive output tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.latency = Histogram("pensieve_request_latency_seconds", "Arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        info = Info("pensieve_cache_config", "Cache configuration", registry=self.registry)
        info.info(cache_labels)
        Info("vllm:cache_config", "Cache configuration (vLLM names)",
             registry=self.registry).info(vllm_cache_config_labels(cache_labels))
        for status in ("stop", "length", "abort"):  # present from the start, at 0
            self.requests.labels(status=status)

    def count_outcome(self, outcome: int | str) -> None:
        """One generation request ended: a finish reason, or the HTTP status it failed with."""
        self.requests.labels(status="error" if outcome == 500 else str(outcome)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

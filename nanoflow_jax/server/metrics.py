"""Prometheus metrics: engine state read at scrape time, request latencies observed as they happen."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _EngineCollector:
  """Reads the engine's counters when /metrics is scraped (plain int reads; no locking needed)."""

  def __init__(self, engine):
    self.engine = engine

  def collect(self):
    e = self.engine
    sched = e.scheduler
    yield GaugeMetricFamily("nanoflow_requests_running", "Sequences running", value=len(sched.running))
    yield GaugeMetricFamily("nanoflow_requests_waiting", "Sequences waiting", value=len(sched.waiting))
    yield GaugeMetricFamily("nanoflow_kv_pages_used", "KV pages in use", value=e.pool.num_used)
    yield GaugeMetricFamily("nanoflow_kv_pages_free", "KV pages free", value=e.pool.num_free)
    pool = e.pool
    yield GaugeMetricFamily("nanoflow_prefix_cache_pages", "KV pages in the prefix cache", value=pool.num_cached)
    yield CounterMetricFamily("nanoflow_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache",
                              value=pool.queried_tokens)
    yield CounterMetricFamily("nanoflow_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                              value=pool.hit_tokens)
    yield GaugeMetricFamily("nanoflow_prefix_cache_hit_rate", "Prompt tokens found / looked up since start",
                            value=pool.hit_tokens / max(pool.queried_tokens, 1))
    yield CounterMetricFamily("nanoflow_prefix_cache_host_hit_tokens", "Prompt tokens copied back from the host KV tier",
                              value=pool.host_hit_tokens)
    yield GaugeMetricFamily("nanoflow_host_kv_pages", "KV pages held in host memory",
                            value=len(pool.host) if pool.host is not None else 0)
    yield CounterMetricFamily("nanoflow_prefix_cache_evictions", "Cached KV pages reused for other content",
                              value=pool.evictions)
    yield CounterMetricFamily("nanoflow_preemptions", "Sequences preempted (recompute)",
                              value=sched.num_preemptions)
    yield CounterMetricFamily("nanoflow_prompt_tokens", "Prompt tokens received", value=e.stats.prompt_tokens)
    yield CounterMetricFamily("nanoflow_generation_tokens", "Tokens generated", value=e.stats.generated_tokens)
    yield GaugeMetricFamily("nanoflow_host_ms_per_step", "Mean host time per engine step (ms)",
                            value=e.stats.host_ms_per_step)


class Metrics:
  def __init__(self, engine):
    self.registry = CollectorRegistry()
    self.registry.register(_EngineCollector(engine))
    self.requests = Counter("nanoflow_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=self.registry)
    self.ttft = Histogram("nanoflow_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                          registry=self.registry)
    self.tpot = Histogram("nanoflow_time_per_output_token_seconds", "Time per output token after the first",
                          buckets=LATENCY_BUCKETS, registry=self.registry)
    self.e2e = Histogram("nanoflow_e2e_request_latency_seconds", "End-to-end request latency",
                         buckets=LATENCY_BUCKETS, registry=self.registry)
    self.step = Histogram("nanoflow_step_seconds", "Engine step wall time", buckets=LATENCY_BUCKETS,
                          registry=self.registry)

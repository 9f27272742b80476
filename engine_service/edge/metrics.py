"""The engine's Prometheus metrics, kept out of the hot loop.

Two sources, neither of which costs the engine thread anything:
- per request, from the response messages the gRPC layer sends anyway (`EngineMetrics.on_response`, an
  RpcObserver hook): tokens, finish reasons, and the server-side TTFT / E2E / queue-wait timings the
  final message carries; inter-token latency from the gaps between stream messages;
- engine state, read only when Prometheus scrapes (`EngineStatsCollector`): queue depth, running
  requests, KV blocks, prefix-cache hits, and the prompts the engine tokenized itself.
The RPC-level metrics (requests by method and status code, latency) come from tokenwire.serving.metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from tokenwire.engine.edge import convert

# Seconds. TTFT and queue wait: milliseconds on a warm GPU up to minutes behind a long queue.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0, 600.0)


class EngineMetrics:
    """Per-request metrics, fed by the RpcObserver with every Generate / GenerateBatch response."""

    def __init__(self, registry: CollectorRegistry):
        p = "tokenwire_engine_"
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.cached_prompt_tokens = Counter(
            p + "cached_prompt_tokens", "Prompt tokens whose KV came from the prefix cache", registry=registry
        )
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated and sent", registry=registry)
        self.finished = Counter(
            p + "requests_finished", "Requests finished, by finish reason", ("finish_reason",), registry=registry
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Arrival to first token, measured by the engine",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds", "Arrival to first scheduled step", buckets=TTFT_BUCKETS, registry=registry
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds",
            "Arrival to last token, measured by the engine",
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Gap between consecutive tokens of a Generate stream (a message of k tokens after "
            "a gap g counts k gaps of g/k)",
            buckets=ITL_BUCKETS,
            registry=registry,
        )

    def on_response(self, rpc: str, request: Any, response: Any, gap_s: float | None) -> None:
        if rpc == "Generate":
            self._stream_message(response, gap_s)
        elif rpc == "GenerateBatch":
            for result in response.results:
                self.generation_tokens.inc(len(result.token_ids))
                self._finished(result)

    def _stream_message(self, message: Any, gap_s: float | None) -> None:
        n = len(message.token_ids)
        self.generation_tokens.inc(n)
        if gap_s is not None and n:
            for _ in range(n):
                self.itl.observe(gap_s / n)
        if message.finish_reason:
            self._finished(message)

    def _finished(self, message: Any) -> None:
        usage, timings = message.usage, message.timings
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_prompt_tokens.inc(usage.cached_prompt_tokens)
        self.finished.labels(convert.finish_reason_name(message.finish_reason)).inc()
        if message.HasField("timings"):
            self.e2e.observe(timings.total_s)
            if timings.HasField("time_to_first_token_s"):
                self.ttft.observe(timings.time_to_first_token_s)
            if timings.HasField("queue_wait_s"):
                self.queue_wait.observe(timings.queue_wait_s)


class EngineStatsCollector(Collector):
    """Reads the engine's counters at scrape time, from the scrape thread.

    `core_stats()` returns the CoreStats that came with the engine core's last step, or None while the
    model loads (then only the RPC layer's numbers are reported): a scrape never waits on the core.
    """

    def __init__(self, core_stats: Callable[[], Any], active_requests: Callable[[], int]):
        self._core_stats = core_stats
        self._active_requests = active_requests

    def describe(self) -> list:
        return []  # unknown until the engine is loaded; an empty describe keeps registration lazy

    def collect(self) -> Iterator:
        p = "tokenwire_engine_"
        yield GaugeMetricFamily(
            p + "requests_active",
            "Generate/GenerateBatch requests the server is handling",
            value=self._active_requests(),
        )
        core = self._core_stats()
        if core is None:
            return
        stats = core.engine
        yield CounterMetricFamily(
            p + "prompt_encodes",
            "Prompts the engine tokenized itself (text requests); requests sent as token ids cost none",
            value=stats.num_prompt_encodes,
        )
        yield GaugeMetricFamily(
            p + "requests_running", "Requests holding KV blocks, scheduled every step", value=stats.num_running
        )
        yield GaugeMetricFamily(
            p + "requests_waiting", "Queue depth: requests waiting to be scheduled", value=stats.num_waiting
        )
        yield GaugeMetricFamily(p + "kv_blocks_total", "KV-cache blocks in the pool", value=stats.num_kv_blocks)
        yield GaugeMetricFamily(
            p + "kv_blocks_free",
            "KV-cache blocks free (unreferenced cached blocks count)",
            value=stats.num_free_kv_blocks,
        )
        yield GaugeMetricFamily(
            p + "kv_blocks_used",
            "KV-cache blocks held by requests",
            value=stats.num_kv_blocks - stats.num_free_kv_blocks,
        )
        yield GaugeMetricFamily(
            p + "prefix_cache_hit_rate",
            "Prompt tokens served by the prefix cache / looked up, since start",
            value=stats.prefix_cache_hit_rate,
        )
        yield CounterMetricFamily(
            p + "prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            value=core.prefix_cache_queried_tokens,
        )
        yield CounterMetricFamily(
            p + "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", value=core.prefix_cache_hit_tokens
        )
        yield CounterMetricFamily(
            p + "preemptions", "Requests preempted (blocks reclaimed, recomputed later)", value=stats.num_preemptions
        )
        yield CounterMetricFamily(
            p + "spec_draft_tokens", "Speculative draft tokens verified", value=stats.num_draft_tokens
        )
        yield CounterMetricFamily(
            p + "spec_accepted_tokens",
            "Speculative draft tokens accepted (kept as output)",
            value=stats.num_accepted_draft_tokens,
        )
        yield GaugeMetricFamily(
            p + "spec_acceptance_rate",
            "Accepted / verified speculative draft tokens, since start",
            value=stats.draft_acceptance_rate,
        )

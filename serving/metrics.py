"""Prometheus metrics every tokenwire server shares: the HTTP endpoint and per-RPC metrics.

Each server owns a `CollectorRegistry` (never the process-global one), so tests can run several servers
in one process and every endpoint shows only its own server. `RpcObserver` (rpc_observer.py) feeds
`RpcMetrics` for every RPC and hands each response message to a service's hook, e.g.
the tokenizer's `TokenizerMetrics.on_response`, so the servicers themselves stay free of metrics code.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)

# Seconds: from sub-millisecond tokenizer calls up to multi-minute generations.
RPC_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class MetricsEndpoint:
    """`/metrics` over HTTP for one registry, on a daemon thread (scrapes never touch the event loop)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.port: int | None = None
        self._httpd = None

    def start(self, host: str, port: int) -> int:
        """Binds `host:port` (0: a free port) and returns the bound port."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._httpd.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class RpcMetrics:
    """Requests by RPC and status code, RPC latency, and RPCs in flight."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "tokenwire_rpc_requests",
            "Finished RPCs by service, method and status code",
            ("service", "rpc", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "tokenwire_rpc_duration_seconds",
            "RPC latency, start to status",
            ("service", "rpc"),
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("tokenwire_rpc_in_flight", "RPCs being served", ("service", "rpc"), registry=registry)
        self._children: dict[tuple[str, ...], Any] = {}  # `labels()` costs ~10 us a call: resolve each once

    def started(self, service: str, rpc: str) -> None:
        self._child(self.in_flight, service, rpc).inc()

    def finished(self, service: str, rpc: str, code: str, seconds: float) -> None:
        self._child(self.in_flight, service, rpc).dec()
        self._child(self.requests, service, rpc, code).inc()
        self._child(self.duration, service, rpc).observe(seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

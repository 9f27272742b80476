"""Prometheus metrics of the gateway, served at GET /metrics from its own registry: requests by route and
HTTP status, latency to the end of the response, requests in flight."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response
from tokenwire.serving.metrics import RPC_LATENCY_BUCKETS


class HttpMetrics:
    """A pure ASGI middleware (no per-request task or buffering, so streams pass straight through)."""

    def __init__(self, app, registry: CollectorRegistry, routes: set[str]):
        self.app = app
        self.routes = routes  # known paths; others are counted as "other" (no label explosion)
        self.requests = Counter(
            "tokenwire_http_requests",
            "Finished HTTP requests by route and status",
            ("route", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "tokenwire_http_duration_seconds",
            "HTTP request latency, start to last byte",
            ("route",),
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("tokenwire_http_in_flight", "HTTP requests being served", ("route",), registry=registry)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = [500]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        start = time.perf_counter()
        self.in_flight.labels(route).inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.in_flight.labels(route).dec()
            self.requests.labels(route, str(status[0])).inc()
            self.duration.labels(route).observe(time.perf_counter() - start)


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

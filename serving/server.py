"""The lifecycle every tokenwire gRPC server shares, written once.

Order matters for orchestration:
- `start()` binds the port and answers grpc.health.v1 (NOT_SERVING) and reflection at once, and starts
  /metrics, so probes work while the service loads;
- the service's `load()` does the slow part off the event loop, then calls `set_serving()`;
- `stop()` reports NOT_SERVING first (balancers stop routing here), runs the service's `drain` hook for
  the grace period, then closes the server.
`serve_until_signal()` strings these together for a CLI: load, serve until SIGINT/SIGTERM, stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry
from tokenwire.serving import security
from tokenwire.serving.config import GrpcServerConfig
from tokenwire.serving.health import BoundedHealthServicer
from tokenwire.serving.metrics import MetricsEndpoint, RpcMetrics
from tokenwire.serving.request_guard import RequestGuard
from tokenwire.serving.rpc_budget import RpcBudget
from tokenwire.serving.rpc_observer import ResponseHook, RpcObserver

log = logging.getLogger(__name__)

_NO_PORT_SHARING = [("grpc.so_reuseport", 0)]  # a second server on a busy port must fail, not share it
# Calls gRPC admits beyond the service's bound and the Watch budget: health Checks, and calls refused
# (credentials, budget) in the microseconds before they end.
_SHORT_CALL_HEADROOM = 64


class GrpcServer:
    """One gRPC server: a service, grpc.health.v1, reflection and /metrics, with TLS, auth and the request
    guard. Subclasses register their servicer in `add_servicer`, load in `load`, and may drain in `drain`."""

    service_name: str = ""  # full proto name of the service, e.g. "tokenwire.v1.EngineService"
    display_name: str = ""  # how logs name this server, e.g. "tokenwire-engine"

    def __init__(self, config: GrpcServerConfig, *, max_concurrent_rpcs: int | None = None):
        self.config = config
        self.health = BoundedHealthServicer(config.max_health_watches)
        self.registry = CollectorRegistry()  # this server's own: several servers can share a process
        self.metrics_endpoint = MetricsEndpoint(self.registry)
        self.port: int | None = None
        # Feeds the RPC metrics; a service hands its per-response hook to `observe_responses`.
        self._observer = RpcObserver(RpcMetrics(self.registry))
        self._max_concurrent_rpcs = max_concurrent_rpcs
        self._server: grpc.aio.Server | None = None
        self.failure: str | None = None  # why the service cannot go on (see `fail`)
        self._failed = asyncio.Event()

    def observe_responses(self, hook: ResponseHook) -> None:
        """`hook` sees every successful response message (a service's own metrics)."""
        self._observer.on_response = hook

    def add_servicer(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    async def load(self) -> Any:
        """The slow part (model, tokenizer); ends with `await self.set_serving()`."""
        raise NotImplementedError

    async def drain(self, grace_s: float) -> float:
        """Called by `stop()` after health went NOT_SERVING: may wait for in-flight work itself, and returns
        the grace the gRPC server still gives to RPCs before cancelling them."""
        return grace_s

    async def close(self) -> None:
        """Called by `stop()` after the gRPC server stopped: release what `load()` started."""

    async def start(self) -> int:
        """Binds and starts serving health (NOT_SERVING until `load`) and reflection; returns the port."""
        # Outermost first: observe every call, then authenticate, then bound the service's calls in flight,
        # then turn unparsable requests into INVALID_ARGUMENT.
        budget = [] if self._max_concurrent_rpcs is None else [RpcBudget(self._max_concurrent_rpcs)]
        interceptors = [self._observer, *security.server_interceptors(self.config.auth_token), *budget, RequestGuard()]
        server = grpc.aio.server(
            options=_NO_PORT_SHARING + self.config.grpc_options,
            interceptors=interceptors,
            maximum_concurrent_rpcs=self._rpc_limit(),
        )
        self.add_servicer(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((self.service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # TLS when a certificate is configured; raises if the address is taken.
        self.port = security.add_port(
            server, self.config.address, self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca
        )
        await server.start()
        self._server = server
        if self.config.metrics_port >= 0:
            self.metrics_endpoint.start(self.config.host, self.config.metrics_port)
        log.info("%s listening on %s:%d (loading)", self.display_name, self.config.host, self.port)
        return self.port

    def _rpc_limit(self) -> int | None:
        """gRPC's own limit on calls in flight, an outer bound: the service's calls are bounded exactly by
        RpcBudget and Watch streams by the health servicer, so watchers (who need no token) never take a
        slot the service's callers could have."""
        if self._max_concurrent_rpcs is None:
            return None
        return self._max_concurrent_rpcs + self.health.max_watches + _SHORT_CALL_HEADROOM

    async def set_serving(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def fail(self, reason: str) -> None:
        """The service cannot serve any more (e.g. its engine core died): NOT_SERVING now, and
        `serve_until_signal` stops the server and ends with ServiceFailed, so the process exits non-zero."""
        log.error("%s cannot serve: %s", self.display_name, reason)
        self.failure = self.failure or reason
        self._failed.set()
        asyncio.ensure_future(self.health.enter_graceful_shutdown())

    async def wait_failed(self) -> str:
        await self._failed.wait()
        return self.failure

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING first (and it stays so), then drain, then close the server and the service."""
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        rpc_grace_s = await self.drain(grace_s)
        if self._server is not None:
            await self._server.stop(rpc_grace_s)  # cancels what is still running when the grace ends
            self._server = None
        await self.close()
        self.metrics_endpoint.stop()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for name in ("", self.service_name):  # "" is the whole server, as grpc-health-probe asks by default
            await self.health.set(name, status)


class ServiceFailed(RuntimeError):
    """The server stopped because it could not serve any more (GrpcServer.fail)."""


async def serve_until_signal(server: GrpcServer, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Starts `server`, loads it, and serves until a signal; then stops gracefully. A failed load ends the
    process with that error (after the stop); so does a failure while serving (ServiceFailed)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    loading = asyncio.create_task(server.load())
    signalled = asyncio.create_task(stopping.wait())
    failed = asyncio.create_task(server.wait_failed())
    try:
        await asyncio.wait({loading, signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and not failed.done():
            loading.result()  # re-raises a load failure
            await asyncio.wait({signalled, failed}, return_when=asyncio.FIRST_COMPLETED)
        log.info("%s shutting down", server.display_name)
    finally:
        loading.cancel()
        signalled.cancel()
        failed.cancel()
        await server.stop()
    if server.failure is not None:
        raise ServiceFailed(server.failure)

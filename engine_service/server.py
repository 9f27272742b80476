"""The engine's gRPC server: lifecycle around EngineServicer, grpc.health.v1, reflection, and Prometheus
/metrics (RPC metrics and per-request metrics from the RpcObserver interceptor, engine gauges at scrape).

Order matters for orchestration: the port is bound and health answers NOT_SERVING first, then the model
loads and runs one warm-up generation, and only then does health turn SERVING. On shutdown health goes
NOT_SERVING again, new requests are refused, in-flight ones get a grace period, the rest are aborted.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tokenwire.engine.config import EngineConfig
from tokenwire.engine.metrics import EngineMetrics, EngineStatsCollector
from tokenwire.engine.sampling_params import SamplingParams
from tokenwire.engine.servicer import EngineServicer
from tokenwire.tokenizer import security
from tokenwire.tokenizer.config import GrpcServerConfig
from tokenwire.tokenizer.metrics import MetricsEndpoint, RpcMetrics
from tokenwire.tokenizer.request_guard import RequestGuard
from tokenwire.tokenizer.rpc_observer import RpcObserver
from tokenwire.v1 import engine_pb2, engine_pb2_grpc

if TYPE_CHECKING:  # the engine (torch, transformers) is imported by load(), after the port is bound
    from tokenwire.engine.engine import LLMEngine
    from tokenwire.engine.engine_loop import EngineLoop

log = logging.getLogger(__name__)

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
_CHANNEL_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not silently share it
]


@dataclass(frozen=True)
class ServerConfig(GrpcServerConfig):
    port: int = 50052                    # 0 picks a free port (logged)
    drain_grace_s: float = 30.0          # after SIGTERM, how long in-flight requests may still finish
    max_pending_requests: int = 1024     # requests in flight before new ones get RESOURCE_EXHAUSTED
    max_waiting_requests: int = 512      # accepted requests not yet generating before new ones get RESOURCE_EXHAUSTED


class EngineServer:
    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig = ServerConfig()):
        self.engine_config = engine_config
        self.config = server_config
        self.servicer = EngineServicer(server_config.max_pending_requests, server_config.max_waiting_requests)
        self.health = health.aio.HealthServicer()
        self.engine_loop: EngineLoop | None = None
        self.port: int | None = None
        self.registry = CollectorRegistry()  # this server's own: several servers can share a process
        self.metrics = EngineMetrics(self.registry)
        self.registry.register(EngineStatsCollector(
            lambda: self.engine_loop and self.engine_loop.engine, lambda: self.servicer.num_active_requests))
        self.metrics_endpoint = MetricsEndpoint(self.registry)
        observer = RpcObserver(RpcMetrics(self.registry), self.metrics.on_response)
        # Outermost first: observe every call, then authenticate, then turn unparsable requests into
        # INVALID_ARGUMENT.
        interceptors = [observer, *security.server_interceptors(server_config.auth_token), RequestGuard()]
        self._server = grpc.aio.server(options=_CHANNEL_OPTIONS + server_config.grpc_options,
                                       interceptors=interceptors)
        engine_pb2_grpc.add_EngineServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)

    async def start(self) -> int:
        """Bind and answer health checks (NOT_SERVING); returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        config = self.config  # TLS when a certificate is configured; raises if it cannot bind
        self.port = security.add_port(self._server, config.address, config.tls_cert, config.tls_key,
                                      config.tls_client_ca)
        await self._server.start()
        if self.config.metrics_port >= 0:
            self.metrics_endpoint.start(self.config.host, self.config.metrics_port)
        log.info("tokenwire-engine listening on %s:%d (loading the model)", self.config.host, self.port)
        return self.port

    async def load(self) -> None:
        """Load and warm up the model off the event loop, start the engine thread, turn SERVING."""
        engine = await asyncio.to_thread(_load_engine, self.engine_config)
        from tokenwire.engine.engine_loop import EngineLoop

        self.engine_loop = EngineLoop(engine).start()
        self.servicer.attach(self.engine_loop)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("tokenwire-engine serving %s on port %d", self.engine_config.model, self.port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new work, let in-flight requests finish for up to grace_s, abort the rest."""
        grace_s = self.config.drain_grace_s if grace_s is None else grace_s
        self.servicer.draining = True
        await self.health.enter_graceful_shutdown()  # NOT_SERVING, and it stays so
        try:
            await asyncio.wait_for(self.servicer.wait_idle(), grace_s)
        except asyncio.TimeoutError:
            if self.servicer.num_active_requests:
                log.warning("%d requests still running after %.1fs; aborting them",
                            self.servicer.num_active_requests, grace_s)
        await self._server.stop(grace=1.0)  # cancels what is left; their handlers abort in the engine
        if self.engine_loop is not None:
            await asyncio.to_thread(self.engine_loop.stop)
        self.metrics_endpoint.stop()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)


def _load_engine(config: EngineConfig) -> LLMEngine:
    from tokenwire.engine.engine import LLMEngine

    engine = LLMEngine(config)
    # One tiny generation (prefill + decode) so the first real request does not pay one-time costs.
    engine.generate(prompt_token_ids=[[1] * 8], params=SamplingParams(max_new_tokens=2, temperature=0.0))
    return engine


async def serve(engine_config: EngineConfig, server_config: ServerConfig = ServerConfig()) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit."""
    server = EngineServer(engine_config, server_config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading in done:
            loading.result()  # a model that fails to load ends the process with its error
            await stopping
    finally:
        loading.cancel()
        stopping.cancel()
        log.info("tokenwire-engine shutting down")
        await server.stop()

"""Builds and runs the tokenizer's grpc.aio server.

Lifecycle: `start()` binds the port and serves health (NOT_SERVING) and reflection at once, so
orchestrators can probe while `load()` reads the tokenizer in a thread; health turns SERVING when
the codec is attached. `stop()` reports NOT_SERVING first, then drains in-flight RPCs for the grace
period. `serve()` strings these together for the CLI, stopping gracefully on SIGINT/SIGTERM.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tokenwire.tokenizer import security
from tokenwire.tokenizer.codec import TokenCodec
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.metrics import MetricsEndpoint, RpcMetrics, TokenizerMetrics
from tokenwire.tokenizer.request_guard import RequestGuard
from tokenwire.tokenizer.rpc_observer import RpcObserver
from tokenwire.tokenizer.servicer import TokenizerServicer
from tokenwire.tokenizer.tokenizer import TokenizerInfo, load_tokenizer
from tokenwire.v1 import tokenizer_pb2, tokenizer_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
_HEALTH_SERVICES = ("", SERVICE_NAME)  # "" is the whole server, as grpc-health-probe asks by default


class TokenizerServer:
    """One server: TokenizerService + grpc.health.v1 + server reflection on one port, and /metrics."""

    def __init__(self, config: TokenizerServiceConfig):
        self.config = config
        self.servicer = TokenizerServicer(config)
        self.health = health.aio.HealthServicer()
        self.registry = CollectorRegistry()  # this server's own: several servers can share a process
        self.metrics = TokenizerMetrics(self.registry)
        self.metrics_endpoint = MetricsEndpoint(self.registry)
        self._observer = RpcObserver(RpcMetrics(self.registry), self.metrics.on_response)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> int:
        """Binds and starts serving (health NOT_SERVING until `load`); returns the bound port."""
        # Outermost first: observe every call, then authenticate, then turn unparsable requests into
        # INVALID_ARGUMENT.
        interceptors = [self._observer, *security.server_interceptors(self.config.auth_token), RequestGuard()]
        server = grpc.aio.server(options=self.config.grpc_options, interceptors=interceptors,
                                 maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # TLS when a certificate is configured; raises if the address is taken.
        self.port = security.add_port(server, self.config.address, self.config.tls_cert, self.config.tls_key,
                                      self.config.tls_client_ca)
        await server.start()
        self._server = server
        if self.config.metrics_port >= 0:
            self.metrics_endpoint.start(self.config.host, self.config.metrics_port)
        log.info("tokenizer service listening on %s:%d (loading %s)", self.config.host, self.port, self.config.model)
        return self.port

    async def load(self, tokenizer: Any = None) -> TokenizerInfo:
        """Loads the tokenizer (or takes a loaded one) off the event loop, then reports SERVING."""
        if tokenizer is None:
            tokenizer = await asyncio.to_thread(load_tokenizer, self.config.model, self.config.trust_remote_code)
        codec = await asyncio.to_thread(TokenCodec, tokenizer, self.config.model)  # fingerprinting: ~0.3 s
        self.servicer.attach(codec)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("tokenizer ready: vocab %d, fingerprint %s", codec.info.vocab_size, codec.info.fingerprint)
        return codec.info

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING first (so balancers stop routing here), then drain and close."""
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.drain_grace_s if grace_s is None else grace_s)
            self._server = None
        self.metrics_endpoint.stop()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status: int) -> None:
        for name in _HEALTH_SERVICES:
            await self.health.set(name, status)


async def serve(config: TokenizerServiceConfig) -> None:
    """Runs until SIGINT/SIGTERM, then stops gracefully; a failed load stops it with that error."""
    server = TokenizerServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    loading = asyncio.create_task(server.load())
    signalled = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({loading, signalled}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # re-raises a load failure
            await signalled
        log.info("shutting down")
    finally:
        loading.cancel()
        signalled.cancel()
        await server.stop()

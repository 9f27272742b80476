"""The engine's gRPC server: EngineService on the shared server lifecycle (tokenwire.serving.server), plus
the engine's gauges on /metrics (read at scrape time) and per-request metrics from the response stream.

The model loads and runs one warm-up generation before health turns SERVING. On shutdown health goes
NOT_SERVING, new requests are refused, in-flight ones get the drain grace, the rest are aborted.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from tokenwire.engine.config import EngineConfig, ServerConfig
from tokenwire.engine.metrics import EngineMetrics, EngineStatsCollector
from tokenwire.engine.sampling_params import SamplingParams
from tokenwire.engine.servicer import EngineServicer
from tokenwire.serving.server import GrpcServer, serve_until_signal
from tokenwire.v1 import engine_pb2, engine_pb2_grpc

if TYPE_CHECKING:  # the engine (torch, transformers) is imported by load(), after the port is bound
    from tokenwire.engine.engine import LLMEngine
    from tokenwire.engine.engine_loop import EngineLoop

log = logging.getLogger(__name__)

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
_ABORT_GRACE_S = 1.0  # after the drain: how long cancelled handlers get to abort their requests


class EngineServer(GrpcServer):
    service_name = SERVICE_NAME
    display_name = "tokenwire-engine"

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig = ServerConfig()):
        super().__init__(server_config)
        self.engine_config = engine_config
        self.servicer = EngineServicer(server_config.max_pending_requests, server_config.max_waiting_requests)
        self.engine_loop: EngineLoop | None = None
        self.metrics = EngineMetrics(self.registry)
        self.observe_responses(self.metrics.on_response)
        self.registry.register(EngineStatsCollector(
            lambda: self.engine_loop and self.engine_loop.engine, lambda: self.servicer.num_active_requests))

    def add_servicer(self, server: grpc.aio.Server) -> None:
        engine_pb2_grpc.add_EngineServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        """Load and warm up the model off the event loop, start the engine thread, turn SERVING."""
        engine = await asyncio.to_thread(_load_engine, self.engine_config)
        from tokenwire.engine.engine_loop import EngineLoop

        self.engine_loop = EngineLoop(engine).start()
        self.servicer.attach(self.engine_loop)
        await self.set_serving()
        log.info("tokenwire-engine serving %s on port %d", self.engine_config.model, self.port)

    async def drain(self, grace_s: float) -> float:
        """Refuse new work and let in-flight requests finish for up to grace_s; the rest are then cancelled."""
        self.servicer.draining = True
        try:
            await asyncio.wait_for(self.servicer.wait_idle(), grace_s)
        except asyncio.TimeoutError:
            if self.servicer.num_active_requests:
                log.warning("%d requests still running after %.1fs; aborting them",
                            self.servicer.num_active_requests, grace_s)
        return _ABORT_GRACE_S  # cancelled handlers abort their requests in the engine

    async def close(self) -> None:
        if self.engine_loop is not None:
            await asyncio.to_thread(self.engine_loop.stop)


def _load_engine(config: EngineConfig) -> LLMEngine:
    from tokenwire.engine.engine import LLMEngine

    engine = LLMEngine(config)
    # One tiny generation (prefill + decode) so the first real request does not pay one-time costs.
    engine.generate(prompt_token_ids=[[1] * 8], params=SamplingParams(max_new_tokens=2, temperature=0.0))
    return engine


async def serve(engine_config: EngineConfig, server_config: ServerConfig = ServerConfig()) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit."""
    await serve_until_signal(EngineServer(engine_config, server_config))

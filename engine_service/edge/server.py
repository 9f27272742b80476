"""The engine's gRPC server: EngineService on the shared server lifecycle (tokenwire.serving.server), plus
the engine's gauges on /metrics (read at scrape time) and per-request metrics from the response stream.

The engine core (scheduler, model runner, sampler: LLMEngine.step) runs in a child process that this
server starts and owns (core/process.py, edge/core_client.py); this process keeps the edge: validation, fingerprint
checks, text encoding, admission, metrics, health and drain. The core loads the model and runs one
warm-up generation before health turns SERVING. If the core dies, the requests in flight end
UNAVAILABLE, health turns NOT_SERVING and the service exits non-zero. On shutdown health goes
NOT_SERVING, new requests are refused, in-flight ones get the drain grace, the rest are aborted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2
from tokenwire.engine.config import EngineConfig, ServerConfig
from tokenwire.engine.edge.metrics import EngineMetrics, EngineStatsCollector
from tokenwire.engine.edge.servicer import EngineServicer
from tokenwire.serving.server import GrpcServer, serve_until_signal
from tokenwire.v1 import engine_pb2, engine_pb2_grpc

if TYPE_CHECKING:  # the engine (torch, transformers) is imported by load(), after the port is bound
    from tokenwire.engine.edge.core_client import CoreClient

log = logging.getLogger(__name__)

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["EngineService"].full_name
_ABORT_GRACE_S = 1.0  # after the drain: how long cancelled handlers get to abort their requests
_WATCHDOG_PERIOD_S = 0.25  # how often the watchdog looks at the core's progress


class EngineServer(GrpcServer):
    service_name = SERVICE_NAME
    display_name = "tokenwire-engine"

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig = ServerConfig()):
        super().__init__(server_config)
        self.engine_config = engine_config
        self.servicer = EngineServicer(server_config.max_pending_requests, server_config.max_waiting_requests)
        self.core: CoreClient | None = None
        self._watchdog: asyncio.Future | None = None
        self.metrics = EngineMetrics(self.registry)
        self.observe_responses(self.metrics.on_response)
        self.registry.register(
            EngineStatsCollector(
                lambda: self.core and self.core.latest_stats(), lambda: self.servicer.num_active_requests
            )
        )

    def add_servicer(self, server: grpc.aio.Server) -> None:
        engine_pb2_grpc.add_EngineServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        """Start the engine core process (it loads and warms up the model), then turn SERVING."""
        from tokenwire.engine.edge.core_client import CoreClient

        core = CoreClient(self.engine_config, on_death=self.fail)
        try:
            await core.start()
        except BaseException:
            await core.stop(timeout=5.0)
            raise
        self.core = core
        self.servicer.attach(core)
        await self.set_serving()
        self._watchdog = asyncio.ensure_future(self._watch_core(core, self.config.core_stall_timeout_s))
        log.info("tokenwire-engine serving %s on port %d", self.engine_config.model, self.port)

    async def drain(self, grace_s: float) -> float:
        """Refuse new work and let in-flight requests finish for up to grace_s; the rest are then cancelled."""
        self.servicer.draining = True
        try:
            await asyncio.wait_for(self.servicer.wait_idle(), grace_s)
        except TimeoutError:
            if self.servicer.num_active_requests:
                log.warning(
                    "%d requests still running after %.1fs; aborting them", self.servicer.num_active_requests, grace_s
                )
        return _ABORT_GRACE_S  # cancelled handlers abort their requests in the engine

    async def _watch_core(self, core: CoreClient, stall_timeout_s: float) -> None:
        """Health follows the core's progress: NOT_SERVING while work waits on a core that has not replied
        for `stall_timeout_s` (stuck, SIGSTOPped), SERVING again once it replies. Health itself is answered
        by the front, which never waits on the core, so a probe gets an answer either way."""
        stalled = False
        while core.death is None:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            if (core.stalled_for() > stall_timeout_s) == stalled:
                continue
            stalled = not stalled
            if stalled:
                log.error("the engine core has not replied for %.1f s with work waiting", core.stalled_for())
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            else:
                log.warning("the engine core replies again")
                await self.set_serving()

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.core is not None:
            await self.core.stop()


async def serve(engine_config: EngineConfig, server_config: ServerConfig = ServerConfig()) -> None:
    """Run until SIGTERM or SIGINT, then drain and exit."""
    await serve_until_signal(EngineServer(engine_config, server_config))

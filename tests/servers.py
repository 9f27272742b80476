"""In-process servers for the reliability and security tests: each runs on its own event-loop thread,
bound to port 0, so tests drive it with ordinary blocking or asyncio stubs and any server config."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from tokenwire.engine.config import EngineConfig, ServerConfig
from tokenwire.engine.edge.server import EngineServer
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.server import TokenizerServer
from tokenwire.v1 import engine_pb2 as pb


class _ServerThread:
    """Builds `cls(*args)` on its own event-loop thread, starts it on port 0 and loads it."""

    def __init__(self, cls, *args) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(_make(cls, *args))
        self.port = self.run(self.server.start())
        self.run(self.server.load())
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class EngineThread(_ServerThread):
    server: EngineServer

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig = ServerConfig(port=0)):
        super().__init__(EngineServer, engine_config, server_config)


class TokenizerThread(_ServerThread):
    server: TokenizerServer

    def __init__(self, config: TokenizerServiceConfig):
        super().__init__(TokenizerServer, config)


async def _make(cls, *args):
    return cls(*args)  # built on the loop that will run it


def wait_until_idle(stub, timeout: float = 10.0, metadata=()) -> pb.EngineStats:
    """Poll GetModelInfo until nothing runs or waits and every KV block is free (an abort lands at
    the engine's next step), or the timeout passes; returns the last stats."""
    end = time.monotonic() + timeout
    while True:
        stats = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata).stats
        idle = stats.num_running == stats.num_waiting == stats.num_active_requests == 0
        if (idle and stats.num_free_kv_blocks == stats.num_kv_blocks) or time.monotonic() > end:
            return stats
        time.sleep(0.01)


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    """The RpcError a call raises (streams are drained); fails the test if it succeeds."""
    try:
        result = fn(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"expected an RpcError, the call succeeded: {result!r}")

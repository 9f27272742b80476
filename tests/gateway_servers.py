"""The gateway in-process for tests: uvicorn on its own thread and event loop, on a port bound before it
starts (port 0), over services given by address."""

from __future__ import annotations

import threading
import time

from tokenwire.gateway.cli import server
from tokenwire.gateway.config import GatewayConfig


class GatewayThread:
    def __init__(self, config: GatewayConfig, timeout_s: float = 30.0):
        self.server, sock = server(config)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + timeout_s
        while not self.server.started:  # uvicorn sets it once the app's lifespan has started
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

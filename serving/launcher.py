"""Runs the services locally as subprocesses, with the same commands docker-compose uses
(`tokenwire-tokenizer ...`, `tokenwire-engine ...`), on free ports: the one launcher of the demo, the
benchmark and the end-to-end tests.

    with LocalServices(model) as services:            # both, SERVING on return; SIGTERM drain on exit
        ...services.tokenizer_address, services.engine_address
    with start_service("tokenwire-tokenizer", ["--model", m]) as tokenizer:   # one of them
        tokenizer.wait_serving()
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TOKENIZER, ENGINE, GATEWAY = "tokenwire-tokenizer", "tokenwire-engine", "tokenwire-gateway"
_READY_TIMEOUT_S = 600.0  # model conversion, load and warm-up on a busy 2-core machine


@dataclass
class Service:
    """One service process; a context manager that stops it (SIGTERM, a graceful drain) on exit."""

    name: str  # the console script, e.g. "tokenwire-engine"
    address: str  # host:port it serves on
    process: subprocess.Popen
    log_path: Path  # its stdout and stderr
    terminated: bool = False  # SIGTERM sent: never twice (a second one, landing after the service's
    # event loop closed, would kill it mid-exit with -15)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")

    def wait_serving(self, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Block until grpc.health.v1 reports SERVING; fail fast if the process exits first."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self.check_running()
                try:  # bounded, so the loop head sees a process that died before binding its port
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    for reply in stub.Watch(
                        health_pb2.HealthCheckRequest(), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1)
                    ):
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                except (grpc.FutureTimeoutError, grpc.RpcError):
                    continue  # not up yet, or went away, or the watch's slice ended: the loop head decides
        raise TimeoutError(f"{self.name} at {self.address} not SERVING after {timeout_s:.0f}s; log: {self.log_path}")

    def wait_http_ok(self, path: str = "/health", timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Block until `GET path` answers 200 (the gateway's /health: both services SERVING); fail fast if
        the process exits first. Polled: an HTTP server has no watch to block on."""
        deadline = time.monotonic() + timeout_s
        seen = "no answer"
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with urllib.request.urlopen(f"http://{self.address}{path}", timeout=2.0) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as error:
                seen = f"HTTP {error.code}"
            except OSError as error:  # not listening yet
                seen = str(error)
            time.sleep(0.05)
        raise TimeoutError(
            f"{self.name} at {self.address}: GET {path} not 200 after {timeout_s:.0f}s ({seen}); log: {self.log_path}"
        )

    def terminate(self) -> None:
        """SIGTERM (a graceful drain), once."""
        if not self.terminated and self.process.poll() is None:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (a graceful drain), wait, kill after timeout_s; returns the exit code."""
        self.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_service(
    script: str,
    args: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    log_dir: str | Path | None = None,
) -> Service:
    """Spawns `script args --host HOST --port PORT` (a free port unless given); does not wait for it."""
    port = free_port(host) if port is None else port
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tokenwire-"))
    log_path = log_dir / f"{script}.log"
    if log_path.exists():  # a restart on the same address keeps the first run's log
        log_path = log_dir / f"{script}.{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            command(script) + list(args) + ["--host", host, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Service(script, f"{host}:{port}", process, log_path)


class LocalServices:
    """`with LocalServices(model) as services:` starts both services and waits until both are SERVING;
    leaving the block sends SIGTERM (a graceful drain) and waits for both to exit."""

    def __init__(
        self,
        model: str,
        *,
        host: str = "127.0.0.1",
        engine_args: Sequence[str] = (),
        tokenizer_args: Sequence[str] = (),
        log_dir: str | Path | None = None,
        ready_timeout_s: float = 300.0,
    ):
        self.model = model
        self.host = host
        self.engine_args = list(engine_args)
        self.tokenizer_args = list(tokenizer_args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tokenwire-"))
        self.ready_timeout_s = ready_timeout_s
        self.tokenizer: Service | None = None
        self.engine: Service | None = None
        self.exit_codes: dict[str, int] = {}  # filled by stop()

    @property
    def tokenizer_address(self) -> str:
        return self.tokenizer.address

    @property
    def engine_address(self) -> str:
        return self.engine.address

    def __enter__(self) -> LocalServices:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        model = ["--model", self.model]
        self.tokenizer = start_service(TOKENIZER, model + self.tokenizer_args, host=self.host, log_dir=self.log_dir)
        self.engine = start_service(ENGINE, model + self.engine_args, host=self.host, log_dir=self.log_dir)

    def wait_ready(self) -> None:
        """Block until both report SERVING on grpc.health.v1; fail fast if one exits."""
        deadline = time.monotonic() + self.ready_timeout_s
        for service in (self.tokenizer, self.engine):
            service.wait_serving(max(deadline - time.monotonic(), 0.1))

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        """SIGTERM both (engine first), wait for them (kill after timeout_s); returns each one's exit code."""
        services = [s for s in (self.engine, self.tokenizer) if s is not None]
        for service in services:  # signal both before waiting, so they drain at the same time
            service.terminate()
        self.exit_codes = {service.name: service.stop(timeout_s) for service in services}
        return self.exit_codes


def command(script: str) -> list[str]:
    """The console script installed next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / script
    found = str(local) if local.is_file() else shutil.which(script)
    if found is None:
        raise FileNotFoundError(f"{script} is not installed (pip install -e .)")
    return [found]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (another process could still take it before the service binds)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

"""Runs both services locally as subprocesses, with the same commands docker-compose uses
(`tokenwire-tokenizer ...`, `tokenwire-engine ...`), on free ports. Used by the demo and the
end-to-end tests.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenwire.client.errors import DeadlineExceededError
from tokenwire.client.sync_client import Client


@dataclass
class Service:
    name: str                    # the console script, e.g. "tokenwire-engine"
    address: str                 # host:port it serves on
    process: subprocess.Popen
    log_path: Path               # its stdout and stderr

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class LocalServices:
    """`with LocalServices(model) as services:` starts both services and waits until both are SERVING;
    leaving the block sends SIGTERM (a graceful drain) and waits for both to exit."""

    def __init__(self, model: str, *, host: str = "127.0.0.1", engine_args: Sequence[str] = (),
                 log_dir: str | Path | None = None, ready_timeout_s: float = 300.0):
        self.model = model
        self.host = host
        self.engine_args = list(engine_args)
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="tokenwire-"))
        self.ready_timeout_s = ready_timeout_s
        self.tokenizer: Service | None = None
        self.engine: Service | None = None
        self.exit_codes: dict[str, int] = {}   # filled by stop()

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
        common = ["--model", self.model, "--host", self.host]
        self.tokenizer = self._spawn("tokenwire-tokenizer", common)
        self.engine = self._spawn("tokenwire-engine", common + self.engine_args)

    def wait_ready(self) -> None:
        """Block until both report SERVING on grpc.health.v1; fail fast if one exits."""
        end = time.monotonic() + self.ready_timeout_s
        with Client(self.tokenizer_address, self.engine_address) as client:
            while True:
                self._check_running()
                try:
                    client.wait_ready(timeout=min(1.0, max(end - time.monotonic(), 0.01)))
                    return
                except DeadlineExceededError:
                    if time.monotonic() > end:
                        raise TimeoutError(f"services not SERVING after {self.ready_timeout_s:.0f}s; "
                                           f"logs in {self.log_dir}") from None

    def stop(self, timeout_s: float = 30.0) -> dict[str, int]:
        """SIGTERM both, wait for them (kill after timeout_s); returns each one's exit code."""
        services = [s for s in (self.engine, self.tokenizer) if s is not None]
        for service in services:
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes = {}
        for service in services:
            try:
                codes[service.name] = service.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                service.process.kill()
                codes[service.name] = service.process.wait()
        self.exit_codes = codes
        return codes

    def _spawn(self, script: str, args: list[str]) -> Service:
        port = free_port(self.host)
        log_path = self.log_dir / f"{script}.log"
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(command(script) + args + ["--port", str(port)],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return Service(script, f"{self.host}:{port}", process, log_path)

    def _check_running(self) -> None:
        for service in (self.tokenizer, self.engine):
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with code {service.process.returncode}:\n"
                                   f"{service.log_tail()}")


def command(script: str) -> list[str]:
    """The console script installed next to this interpreter (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / script
    found = str(local) if local.is_file() else shutil.which(script)
    if found is None:
        raise FileNotFoundError(f"{script} is not installed (pip install -e .)")
    return [found]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now (another process could still take it before the service binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

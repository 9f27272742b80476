"""`tokenwire-gateway`: the OpenAI-compatible HTTP gateway. Flag defaults come from GatewayConfig; each
flag can also be set through the environment as TOKENWIRE_<FLAG> (tokenwire.serving.cli_env)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import threading

import uvicorn
from tokenwire.gateway import reasoning, tool_parsers
from tokenwire.gateway.app import create_app
from tokenwire.gateway.config import GatewayConfig
from tokenwire.gateway.connections import header_timeout_protocol
from tokenwire.serving.cli_env import config_values, service_parser
from tokenwire.serving.logging_setup import configure_logging

log = logging.getLogger("tokenwire.gateway")


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown (exit code -15); a drained gateway exits 0,
    as the services do."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle_exit)
        yield


def build_parser() -> argparse.ArgumentParser:
    return service_parser("tokenwire-gateway", "tokenwire OpenAI-compatible HTTP gateway", GatewayConfig)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(**config_values(args, GatewayConfig))


def server(config: GatewayConfig) -> tuple[uvicorn.Server, socket.socket]:
    """A uvicorn server for the app, and its listening socket, already bound (so port 0 is known)."""
    if bool(config.tls_cert) != bool(config.tls_key):
        raise SystemExit("--tls-cert and --tls-key go together")
    if config.tool_call_parser not in tool_parsers.PARSERS:
        raise SystemExit(f"--tool-call-parser must be one of {sorted(tool_parsers.PARSERS)}")
    if config.reasoning_parser and config.reasoning_parser not in reasoning.PARSERS:
        raise SystemExit(f"--reasoning-parser must be one of {sorted(reasoning.PARSERS)} (or empty)")
    sock = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    uv = uvicorn.Config(
        create_app(config),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=config.drain_grace_s,
        http=header_timeout_protocol(config.header_timeout_s),
        timeout_keep_alive=config.keep_alive_timeout_s,
        limit_concurrency=config.max_connections,
        ssl_certfile=config.tls_cert or None,
        ssl_keyfile=config.tls_key or None,
    )
    return _Server(uv), sock


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    srv, sock = server(config)
    scheme = "https" if config.tls else "http"
    log.info("gateway listening on %s://%s:%d", scheme, config.host, sock.getsockname()[1])
    srv.run(sockets=[sock])  # SIGTERM: stop accepting, let requests finish for drain_grace_s, exit 0


if __name__ == "__main__":
    main()

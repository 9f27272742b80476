"""`python -m tokenwire.serving.healthcheck [ADDRESS] [--service NAME] [--timeout S]`: exit 0 if SERVING.

A container healthcheck for either service through the standard grpc.health.v1 protocol (what
grpc-health-probe and Kubernetes' gRPC probes speak), without shipping another binary. Exit codes:
0 SERVING, 1 anything else (NOT_SERVING while loading or draining, unreachable, timeout).
Health needs no auth token; a service serving TLS is probed with `--tls-ca` (plus `--tls-cert`/`--tls-key`
under mutual TLS, and `--server-name` when the certificate does not name the probed address).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Tls:
    ca: str  # PEM file that signed the server's certificate
    cert: str = ""  # client certificate and key, for servers that require mutual TLS
    key: str = ""
    server_name: str = ""  # the name in the server's certificate, when not the probed host


def check(address: str, service: str = "", timeout_s: float = 3.0, tls: Tls | None = None) -> tuple[bool, str]:
    """(serving, what was seen). `service=""` asks about the whole server."""
    try:
        with _channel(address, tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as error:
        return False, f"{error.code().name}: {error.details()}"
    except OSError as error:  # an unreadable TLS file
        return False, str(error)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == SERVING, status


def _channel(address: str, tls: Tls | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address)
    read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(tls.ca), read(tls.key), read(tls.cert))
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(address, credentials, options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenwire.serving.healthcheck", description="grpc.health.v1 Check: exit 0 when SERVING, else 1"
    )
    parser.add_argument("address", nargs="?", default="127.0.0.1:50051", help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help="service name to ask about (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument("--tls-ca", default="", help="probe over TLS, trusting this CA (PEM)")
    parser.add_argument("--tls-cert", default="", help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", default="", help="client key (PEM), for mutual TLS")
    parser.add_argument("--server-name", default="", help="name to expect in the server's certificate")
    args = parser.parse_args(argv)
    tls = Tls(args.tls_ca, args.tls_cert, args.tls_key, args.server_name) if args.tls_ca else None
    serving, seen = check(args.address, args.service, args.timeout, tls)
    if not args.quiet:
        print(f"{args.address}: {seen}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())

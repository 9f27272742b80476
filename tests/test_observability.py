"""Unit tests of the operations plumbing both services share: flags from the environment, JSON logs with
request ids, the RPC observer's status codes, request ids and metrics (on a real in-process server), and
the container healthcheck over TLS."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from tokenwire.engine.cli import build_parser as engine_parser
from tokenwire.serving.cli_env import apply_env_defaults
from tokenwire.serving.healthcheck import main as healthcheck_main
from tokenwire.serving.logging_setup import configure_logging, request_id_var
from tokenwire.serving.metrics import RpcMetrics
from tokenwire.serving.rpc_observer import RpcObserver
from tokenwire.tokenizer.cli import build_parser as tokenizer_parser

# ---- flags from the environment ----


def _parse(build, environ: dict, argv: list[str] = ()):
    parser = build()
    apply_env_defaults(parser, environ)  # again, with a known environment instead of os.environ
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("build", [tokenizer_parser, engine_parser], ids=["tokenizer", "engine"])
def test_every_flag_can_come_from_the_environment(build):
    env = {
        "TOKENWIRE_PORT": "6000",
        "TOKENWIRE_MODEL": "/models/x",
        "TOKENWIRE_LOG_FORMAT": "json",
        "TOKENWIRE_TRUST_REMOTE_CODE": "true",
        "TOKENWIRE_DRAIN_GRACE_S": "2.5",
        "TOKENWIRE_METRICS_PORT": "9090",
    }
    args = _parse(build, env)
    assert (args.port, args.model, args.log_format, args.trust_remote_code, args.drain_grace_s, args.metrics_port) == (
        6000,
        "/models/x",
        "json",
        True,
        2.5,
        9090,
    )
    assert _parse(build, env, ["--port", "7000", "--no-trust-remote-code"]).port == 7000  # a flag wins
    assert "[env: TOKENWIRE_PORT]" in build().format_help()


@pytest.mark.parametrize("build", [tokenizer_parser, engine_parser], ids=["tokenizer", "engine"])
def test_help_never_shows_a_secret_from_the_environment(build, monkeypatch):
    monkeypatch.setenv("TOKENWIRE_AUTH_TOKEN", "s3cret-value")
    parser = build()
    assert parser.parse_args([]).auth_token == "s3cret-value"
    assert "s3cret" not in parser.format_help() and "TOKENWIRE_AUTH_TOKEN" in parser.format_help()


def test_engine_specific_flags_come_from_the_environment():
    args = _parse(engine_parser, {"TOKENWIRE_NUM_BLOCKS": "64", "TOKENWIRE_ENABLE_PREFIX_CACHE": "0"})
    assert (args.num_blocks, args.enable_prefix_cache) == (64, False)


@pytest.mark.parametrize(
    "env", [{"TOKENWIRE_PORT": "fifty"}, {"TOKENWIRE_LOG_FORMAT": "xml"}, {"TOKENWIRE_TRUST_REMOTE_CODE": "maybe"}]
)
def test_a_bad_environment_value_is_reported_by_name(env, capsys):
    with pytest.raises(SystemExit):
        _parse(tokenizer_parser, env)
    assert next(iter(env)) in capsys.readouterr().err


# ---- logs ----


def test_json_logs_are_one_object_per_line_with_the_request_id():
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:
        log = logging.getLogger("tokenwire.test")
        log.info("outside")
        token = request_id_var.set("rid-42")
        log.warning("inside %d", 7, extra={"rpc": "Encode"})
        request_id_var.reset(token)
    finally:
        configure_logging("WARNING", "text")
    first, second = map(json.loads, stream.getvalue().splitlines())
    assert first["message"] == "outside" and "request_id" not in first
    assert second == {
        **second,
        "message": "inside 7",
        "level": "WARNING",
        "request_id": "rid-42",
        "rpc": "Encode",
        "logger": "tokenwire.test",
    }


# ---- the RPC observer, on a real server ----


class _Health(health.aio.HealthServicer):
    async def Check(self, request, context):
        if request.service == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "service: bad")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_the_observer_counts_status_codes_and_binds_the_callers_request_id():
    seen: list[tuple[str, str | None]] = []
    registry = CollectorRegistry()

    def hook(rpc, request, response, gap_s):
        seen.append((rpc, request_id_var.get()))

    async def scenario():
        server = grpc.aio.server(interceptors=[RpcObserver(RpcMetrics(registry), hook)])
        health_pb2_grpc.add_HealthServicer_to_server(_Health(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "abc"),))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Check(health_pb2.HealthCheckRequest(service="bad"))
            watch = stub.Watch(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "w1"),))
            await watch.read()
            watch.cancel()
        await server.stop(None)

    asyncio.run(scenario())
    sample = lambda code: registry.get_sample_value(  # noqa: E731
        "tokenwire_rpc_requests_total", {"service": "Health", "rpc": "Check", "code": code}
    )
    assert (sample("OK"), sample("INVALID_ARGUMENT")) == (1.0, 1.0)
    assert (
        registry.get_sample_value(
            "tokenwire_rpc_requests_total", {"service": "Health", "rpc": "Watch", "code": "CANCELLED"}
        )
        == 1.0
    )
    assert seen == [("Check", "abc")]  # one successful response; Watch sends through context.write, unobserved


# ---- the container healthcheck ----


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_healthcheck_probes_a_tls_server(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            "1",
            "-subj",
            "/CN=tokenwire.test",
            "-addext",
            "subjectAltName=DNS:tokenwire.test",
        ],
        check=True,
        capture_output=True,
    )

    async def scenario() -> list[int]:
        server, servicer = grpc.aio.server(), health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            return [
                await asyncio.to_thread(healthcheck_main, argv)
                for argv in (
                    [address, "--quiet", "--tls-ca", str(cert), "--server-name", "tokenwire.test"],
                    [address, "--quiet", "--timeout", "1"],  # plaintext to a TLS port
                    [address, "--quiet", "--tls-ca", str(tmp_path / "missing.pem")],
                )
            ]
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == [0, 1, 1]

"""Graceful shutdown of the engine as a process: SIGTERM in the middle of a stream.

Health turns NOT_SERVING at once, a new request is refused with UNAVAILABLE, the stream in flight runs to
its last token, and the process exits 0. The stream is long (600 tokens) and read only after the checks,
so it is still in flight while they run.
"""

from __future__ import annotations

import json
import signal
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenwire.serving.launcher import command, free_port
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

from tests.reference import ENGINE_DTYPE

MAX_NEW_TOKENS = 600  # long enough to still be streaming while the checks run (context: 1024)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory):
    port, log_path = free_port(), tmp_path_factory.mktemp("lifecycle") / "engine.log"
    argv = command("tokenwire-engine") + [
        "--model",
        tiny_llama_dir,
        "--port",
        str(port),
        "--dtype",
        ENGINE_DTYPE,
        "--num-blocks",
        "128",
        "--drain-grace-s",
        "60",
        "--log-format",
        "json",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        _wait_for(channel, health_pb2.HealthCheckResponse.SERVING, process, timeout_s=180)
        yield process, channel, log_path
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_drains_the_stream_in_flight_then_exits_zero(engine):
    process, channel, log_path = engine
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2, 3, 4]),
        sampling=pb.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True),
    )
    stream = stub.Generate(request, timeout=120)
    first = next(stream)
    assert len(first.token_ids) >= 1

    process.send_signal(signal.SIGTERM)
    _wait_for(channel, health_pb2.HealthCheckResponse.NOT_SERVING, process, timeout_s=30)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    rest = list(stream)  # the stream in flight is not cut short
    assert sum(len(m.token_ids) for m in [first, *rest]) == MAX_NEW_TOKENS
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert process.wait(timeout=60) == 0

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    codes = [r["code"] for r in records if r.get("rpc") == "Generate"]
    assert sorted(codes) == ["OK", "UNAVAILABLE"]


def _wait_for(channel: grpc.Channel, status: int, process: subprocess.Popen, timeout_s: float) -> None:
    """Watch grpc.health.v1 until it reports `status` (the server pushes every change: no polling)."""
    try:
        for response in health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=timeout_s, wait_for_ready=True
        ):
            if response.status == status:
                return
    except grpc.RpcError as error:
        raise RuntimeError(f"health watch ended with {error.code()} (engine exit code: {process.poll()})") from error
    raise RuntimeError(f"health watch ended early (engine exit code: {process.poll()})")

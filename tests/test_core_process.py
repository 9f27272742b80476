"""The engine core as a child process of the engine service, run as docker-compose runs it.

- The core killed (SIGKILL) mid-stream: the stream ends UNAVAILABLE within 1 s, saying the core died;
  health turns NOT_SERVING; the service exits non-zero (so a restart policy brings it back).
- The front killed (SIGKILL) or stopped (SIGTERM): the core goes with it; no process is left behind.
Process exits are awaited through pidfds (poll), never by sleeping.
"""

from __future__ import annotations

import gc
import os
import re
import select
import signal
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenwire.bench.proc_cpu import children, engine_core_pid
from tokenwire.engine.core.process import freeze_startup_heap
from tokenwire.serving.launcher import command, free_port
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

from tests.reference import ENGINE_DTYPE

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds")


@pytest.fixture
def engine(tiny_llama_dir, tmp_path):
    port = free_port()
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
        "5",
    ]
    with open(tmp_path / "engine.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        _wait_serving(channel, process)
        core_pid = engine_core_pid(process.pid)
        assert core_pid is not None
        yield process, channel, core_pid, tmp_path / "engine.log"
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def test_core_killed_ends_streams_unavailable_at_once_and_the_service_exits_nonzero(engine):
    process, channel, core_pid, log_path = engine
    health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    assert next(health).status == SERVING
    stub = engine_pb2_grpc.EngineServiceStub(channel)
    streams = [stub.Generate(_long_request(i), timeout=60) for i in range(3)]
    for stream in streams:
        assert next(stream).token_ids

    os.kill(core_pid, signal.SIGKILL)
    start = time.monotonic()
    for stream in streams:
        with pytest.raises(grpc.RpcError) as failed:
            list(stream)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine core died" in failed.value.details()
    assert time.monotonic() - start < 1.0

    statuses = [reply.status for reply in _until_closed(health)]
    assert NOT_SERVING in statuses
    assert process.wait(30) != 0, log_path.read_text()
    _assert_gone(core_pid)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_core_never_outlives_its_front(engine, how):
    process, channel, core_pid, _ = engine
    helpers = children(process.pid)  # the core, and multiprocessing's resource tracker
    assert core_pid in helpers
    fds = [os.pidfd_open(pid) for pid in helpers]
    try:
        process.send_signal(how)
        process.wait(30)
        for fd in fds:
            assert select.select([fd], [], [], 10)[0] == [fd], "a child process outlived the engine service"
    finally:
        for fd in fds:
            os.close(fd)
    if how == signal.SIGTERM:
        assert process.returncode == 0


def test_the_core_freezes_its_startup_heap_before_it_serves(engine):
    """Torch's, transformers' and the model's objects leave the collector's full passes (each walked all of
    them: a 170 ms stall of the loop for the default model) before the first request."""
    log_text = engine[3].read_text()
    frozen = re.search(r"froze (\d+) startup objects", log_text)
    assert frozen, log_text
    assert int(frozen.group(1)) > 50_000


def test_freeze_startup_heap_takes_live_objects_out_of_full_collections():
    gc.collect()
    startup = [[i] for i in range(20_000)]  # tracked containers, alive across the freeze
    try:
        walked_before = len(gc.get_objects())
        # Not >= walked_before: the freeze collects garbage first, and other tests' threads may have left some.
        assert freeze_startup_heap() == gc.get_freeze_count() >= len(startup)
        walked = {id(o) for o in gc.get_objects()}
        assert not any(id(obj) in walked for obj in startup)
        assert len(walked) < walked_before - len(startup)
    finally:
        gc.unfreeze()
    assert id(startup[0]) in {id(o) for o in gc.get_objects()}


def _long_request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2, 3, 4 + i]),
        sampling=pb.SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True),
    )


def _until_closed(watch):
    try:
        yield from watch
    except grpc.RpcError:
        return


def _assert_gone(pid: int) -> None:
    """`pid` has exited and been reaped (its /proc entry is gone, or at worst a zombie of init's)."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    assert state == "Z", f"process {pid} is still running (state {state})"


def _wait_serving(channel: grpc.Channel, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        assert process.poll() is None, "the engine exited while loading"
        try:  # bounded, so the loop head sees a process that died before binding its port
            grpc.channel_ready_future(channel).result(timeout=1.0)
            for reply in stub.Watch(health_pb2.HealthCheckRequest(), timeout=5):
                if reply.status == SERVING:
                    return
        except (grpc.FutureTimeoutError, grpc.RpcError):
            continue
    raise TimeoutError("engine not SERVING")


def _health(channel, timeout_s: float = 3.0) -> int:
    """The front's answer; a front blocked on its core would miss this deadline (DEADLINE_EXCEEDED)."""
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status


def _health_becomes(channel, status: int, limit_s: float = 60.0) -> None:
    end = time.monotonic() + limit_s
    while _health(channel) != status:
        assert time.monotonic() < end, (
            f"health never became {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        )
        time.sleep(0.05)


def test_a_stopped_core_turns_health_not_serving_and_never_blocks_the_front(tiny_llama_dir):
    """SIGSTOP the core under a stream and a burst of new requests (more than a pipe's buffer of
    commands): health keeps answering, turns NOT_SERVING past --core-stall-timeout-s, and SERVING again
    after SIGCONT, when the stream carries on and the burst is served."""
    from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig

    from tests.servers import EngineThread

    engine = EngineThread(
        EngineConfig(model=tiny_llama_dir, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=256)),
        ServerConfig(port=0, core_stall_timeout_s=1.0),
    )
    core_pid = engine.server.core.pid
    try:
        with grpc.insecure_channel(engine.address) as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            sampling = pb.SamplingParams(max_new_tokens=900, temperature=0.0, ignore_eos=True)
            stream = stub.Generate(
                pb.GenerateRequest(request_id="long", token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=sampling),
                timeout=120,
            )
            assert next(stream).token_ids
            os.kill(core_pid, signal.SIGSTOP)
            try:
                burst = [
                    stub.Generate(  # a stream call starts at once
                        pb.GenerateRequest(
                            request_id=f"burst-{i}",
                            token_ids=pb.TokenIds(ids=[(7 * i + j) % 1000 + 3 for j in range(800)]),
                            sampling=pb.SamplingParams(max_new_tokens=1, temperature=0.0),
                        ),
                        timeout=120,
                    )
                    for i in range(64)
                ]
                _health_becomes(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
            finally:
                os.kill(core_pid, signal.SIGCONT)
            _health_becomes(channel, health_pb2.HealthCheckResponse.SERVING)
            assert next(stream).token_ids  # the stream carries on
            stream.cancel()
            for call in burst:
                assert list(call)[-1].finish_reason  # every one served
    finally:
        engine.close()

"""Overload and cancellation. Past the bound on requests in flight, or on requests waiting to start, a
new request gets RESOURCE_EXHAUSTED at once (the SDK raises OverloadedError) and the engine keeps
serving what it accepted; a flood ends with every request either served correctly or refused. An abort
lands inside the engine before its next step."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenwire.client import AsyncClient, Client, OverloadedError, RetryPolicy, UnavailableError
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from tokenwire.engine.core.messages import AbortRequest, AddRequest, QueryStats, Ready, StatsReply, StepOutputs, Stop
from tokenwire.engine.core.process import run_core_in_thread
from tokenwire.engine.core.transport import InMemoryTransport
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import FinishReason, Sequence
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc

from tests.reference import ENGINE_DTYPE
from tests.servers import EngineThread, TokenizerThread, rpc_error, wait_until_idle

MAX_RUNNING = 2
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def ids_request(ids, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**sampling))


def endless(i: int) -> pb.GenerateRequest:
    return ids_request([10 + i, 11, 12], max_new_tokens=4096, ignore_eos=True)


@pytest.fixture(scope="module")
def config(tiny_llama_dir) -> EngineConfig:
    return EngineConfig(
        model=tiny_llama_dir,
        dtype=ENGINE_DTYPE,
        cache=CacheConfig(num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=MAX_RUNNING),
    )


@pytest.fixture(scope="module")
def server(config):
    thread = EngineThread(config, ServerConfig(port=0, max_pending_requests=3, max_waiting_requests=2))
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


def test_full_server_refuses_at_once_and_keeps_serving(server, stub):
    servicer = server.server.servicer
    running = [stub.Generate(endless(i), timeout=60) for i in range(MAX_RUNNING)]
    for stream in running:
        assert next(stream).token_ids  # both are generating: max_num_seqs is reached
    queued = stub.Generate(endless(2), timeout=60)  # waits for a free running slot
    _wait_for(lambda: servicer.num_active_requests == 3)

    # Bound 1: requests in flight (3).
    start = time.monotonic()
    error = rpc_error(stub.Generate, ids_request([1, 2], max_new_tokens=2), timeout=30)
    assert error.code() == EXHAUSTED and "in flight" in error.details()
    with Client(tokenizer=None, engine=server.address, timeout=30) as client:
        with pytest.raises(OverloadedError):
            client.complete(token_ids=[1, 2], max_new_tokens=2)
    assert time.monotonic() - start < 2.0  # refused at once, not queued

    # Bound 2: requests waiting to start (2), with room left in flight.
    servicer.max_pending_requests = 10
    also_queued = stub.Generate(endless(3), timeout=60)
    _wait_for(lambda: servicer.num_active_requests == 4)
    error = rpc_error(stub.Generate, ids_request([1, 2], max_new_tokens=2), timeout=30)
    assert error.code() == EXHAUSTED and "waiting" in error.details()

    # The accepted requests were never disturbed: once the first two go, the queued ones start.
    for stream in running:
        assert next(stream).token_ids
        stream.cancel()
    for stream in (queued, also_queued):
        assert next(stream).token_ids
        stream.cancel()
    assert wait_until_idle(stub).num_free_kv_blocks == 128
    servicer.max_pending_requests = 3
    ok = list(stub.Generate(ids_request([1, 2], max_new_tokens=3, ignore_eos=True), timeout=30))
    assert sum(len(r.token_ids) for r in ok) == 3


def test_a_flood_is_served_or_refused_never_hung(server, stub):
    """200 concurrent requests against 3 slots: each either completes with the right tokens or is
    refused with RESOURCE_EXHAUSTED, quickly; nothing leaks."""
    expected = [
        t
        for r in stub.Generate(ids_request([7, 8, 9], max_new_tokens=4, temperature=0.0, ignore_eos=True))
        for t in r.token_ids
    ]

    async def one(aio_stub) -> grpc.StatusCode | list[int]:
        try:
            call = aio_stub.Generate(
                ids_request([7, 8, 9], max_new_tokens=4, temperature=0.0, ignore_eos=True), timeout=60
            )
            return [t async for r in call for t in r.token_ids]
        except grpc.aio.AioRpcError as error:
            return error.code()

    async def flood():
        async with grpc.aio.insecure_channel(server.address) as channel:
            aio_stub = engine_pb2_grpc.EngineServiceStub(channel)
            return await asyncio.gather(*(one(aio_stub) for _ in range(200)))

    start = time.monotonic()
    results = asyncio.run(flood())
    assert time.monotonic() - start < 30
    served = [r for r in results if isinstance(r, list)]
    assert served and all(r == expected for r in served)
    assert all(r == EXHAUSTED for r in results if not isinstance(r, list))
    assert wait_until_idle(stub).num_free_kv_blocks == 128


def test_abort_lands_before_the_next_step(config):
    """A request aborted while its first token is being delivered never gets a second one: the core loop
    applies queued aborts between steps. The production loop runs on a thread, over the in-memory
    transport, and its front answers on the core's thread, before the loop can step again."""
    replies: queue.SimpleQueue = queue.SimpleQueue()

    def deliver(reply):  # the core's thread
        if isinstance(reply, StepOutputs):
            for output in reply.outputs:
                if not output.finished and output.num_output_tokens == 1:
                    transport.put(AbortRequest(output.request_id))
        replies.put(reply)

    transport = InMemoryTransport(deliver)
    thread = run_core_in_thread(config, transport)
    try:
        ready = replies.get(timeout=120)
        assert isinstance(ready, Ready), ready
        seq = Sequence("abort-me", [1, 2, 3], SamplingParams(max_new_tokens=1000, ignore_eos=True))
        transport.put(AddRequest(seq, want_text=False))
        outputs = []
        while not (outputs and outputs[-1].finished):
            reply = replies.get(timeout=30)
            outputs += reply.outputs if isinstance(reply, StepOutputs) else []
        final = outputs[-1]
        assert final.request_id == "abort-me"
        assert final.finish_reason is FinishReason.ABORT and final.num_output_tokens == 1
        transport.put(QueryStats(token=7))
        reply = replies.get(timeout=30)
        assert isinstance(reply, StatsReply) and reply.token == 7
        stats = reply.stats
        assert stats.engine.num_free_kv_blocks == stats.engine.num_kv_blocks and stats.engine.num_running == 0
        assert (stats.engine.num_requests, stats.engine.num_scheduled_requests, stats.num_live_requests) == (0, 0, 0)
    finally:
        transport.put(Stop())
        thread.join(30)
    assert not thread.is_alive()


def test_tokenizer_service_bounds_rpcs_in_flight(smollm2_dir):
    """An open DecodeStream holds the only slot: a new RPC is refused at once, and served once it closes."""
    server = TokenizerThread(TokenizerServiceConfig(model=smollm2_dir, port=0, max_concurrent_rpcs=1))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            encode = tokenizer_pb2.EncodeRequest(text="hello")
            release = threading.Event()

            def requests():
                yield tokenizer_pb2.DecodeStreamRequest(ids=[31873])
                release.wait(30)  # keep the stream open until the refused call is checked

            stream = stub.DecodeStream(requests(), timeout=30)
            next(stream)  # the stream is in flight on the server
            assert rpc_error(lambda: stub.Encode(encode, timeout=10)).code() == EXHAUSTED
            release.set()
            assert list(stream)[-1].final  # half-closed: the stream ends normally
            _wait_for(lambda: _encodes(stub, encode))  # its slot comes back
    finally:
        server.close()


def _encodes(stub, request) -> bool:
    try:
        return len(stub.Encode(request, timeout=10).ids) > 0
    except grpc.RpcError as error:
        assert error.code() == EXHAUSTED
        return False


def _wait_for(condition, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_health_watch_streams_never_take_the_services_rpc_slots(smollm2_dir):
    """Health needs no token, so a flood of Watch streams is capped on its own: past the cap a Watch gets
    RESOURCE_EXHAUSTED, and an authenticated caller keeps every one of the service's RPC slots."""
    config = TokenizerServiceConfig(
        model=smollm2_dir, port=0, max_concurrent_rpcs=2, max_health_watches=3, auth_token="s3cret"
    )
    server = TokenizerThread(config)
    watchers = []
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(8):  # more than the cap and than the service's slots together
                watchers.append(health.Watch(health_pb2.HealthCheckRequest(), timeout=30))
            opened = [_first_watch_reply(watcher) for watcher in watchers]
            assert opened.count(health_pb2.HealthCheckResponse.SERVING) == 3
            assert opened.count(EXHAUSTED) == 5
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            token = (("authorization", "Bearer s3cret"),)
            release = threading.Event()

            def requests():
                yield tokenizer_pb2.DecodeStreamRequest(ids=[31873])
                release.wait(30)

            stream = stub.DecodeStream(requests(), timeout=30, metadata=token)
            next(stream)  # one of the two slots held by a stream, three watchers open
            assert len(stub.Encode(tokenizer_pb2.EncodeRequest(text="hello"), timeout=10, metadata=token).ids) > 0
            release.set()
            assert list(stream)[-1].final
    finally:
        for watcher in watchers:
            watcher.cancel()
        server.close()


def _first_watch_reply(watcher):
    """The first status a Watch stream sends, or the code it was refused with."""
    try:
        return next(watcher).status
    except grpc.RpcError as error:
        return error.code()


def test_tokenizer_stopped_mid_stream_is_unavailable_and_cancels_the_engine_request(tiny_llama_dir):
    """text_from="tokenizer": the tokenizer service stops mid-stream; the SDK raises its typed
    UnavailableError (not asyncio's InvalidStateError), and the engine request is cancelled with it."""
    engine = EngineThread(
        EngineConfig(model=tiny_llama_dir, dtype=ENGINE_DTYPE, native_kernels=False, cache=CacheConfig(num_blocks=64))
    )
    tokenizer = TokenizerThread(TokenizerServiceConfig(model=tiny_llama_dir, port=0))

    async def main():
        client = AsyncClient(
            tokenizer.address, engine.address, text_from="tokenizer", retry=RetryPolicy(max_attempts=1)
        )
        async with client:
            stream = client.generate(token_ids=[1, 2, 3], max_new_tokens=4000, ignore_eos=True)
            await anext(stream)
            await asyncio.to_thread(tokenizer.close)
            with pytest.raises(UnavailableError):
                async for _ in stream:
                    pass

    try:
        asyncio.run(main())
        with grpc.insecure_channel(engine.address) as channel:
            stats = wait_until_idle(engine_pb2_grpc.EngineServiceStub(channel))
        assert stats.num_active_requests == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks
    finally:
        engine.close()

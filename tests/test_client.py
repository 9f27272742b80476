"""The SDK on its own: a light import, one surface for both clients, typed errors, and retries only where
they cannot duplicate output. Real gRPC servers on port 0; no model is loaded."""

from __future__ import annotations

import asyncio
import inspect
import re
import subprocess
import sys

import grpc
import pytest
from tokenwire.client import AsyncClient, Client, InvalidRequestError, RetryPolicy, UnavailableError, cli
from tokenwire.client.convert import chat_messages, sampling_params
from tokenwire.client.types import Completion, FinishReason, Usage
from tokenwire.engine.config import EngineConfig, ServerConfig
from tokenwire.engine.edge.server import EngineServer
from tokenwire.serving.launcher import free_port
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

from tests.rpc_log import CallLog

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002)


def test_import_pulls_no_model_code():
    probe = "import sys, tokenwire.client; print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sync_and_async_clients_have_the_same_surface():
    def surface(cls):
        return {
            name: list(inspect.signature(fn).parameters)
            for name, fn in vars(cls).items()
            if inspect.isfunction(fn) and not name.startswith("_")
        }

    assert surface(Client) == surface(AsyncClient)


def test_sampling_options_are_checked_by_name():
    assert sampling_params({"temperature": 0.0, "seed": None}) == pb.SamplingParams(temperature=0.0)
    with pytest.raises(TypeError, match="temprature"):
        sampling_params({"temprature": 0.5})


def test_chat_roles_are_checked():
    with pytest.raises(InvalidRequestError) as err:
        chat_messages([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}])
    assert err.value.field == "messages[1].role"


class FlakyEngine(engine_pb2_grpc.EngineServiceServicer):
    """Refuses the first `refusals` calls as UNAVAILABLE; the next sends one token, then fails UNAVAILABLE."""

    def __init__(self, refusals: int):
        self.refusals = refusals

    async def Generate(self, request, context):
        if self.refusals > 0:
            self.refusals -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        yield pb.GenerateResponse(token_ids=[7])
        await context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")


async def _serve(servicer) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    engine_pb2_grpc.add_EngineServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_retries_only_before_the_first_token():
    log = CallLog()

    async def main():
        server, address = await _serve(FlakyEngine(refusals=2))
        received = []
        try:
            async with AsyncClient(None, address, retry=FAST_RETRY, interceptors=log.interceptors) as client:
                with pytest.raises(UnavailableError, match="mid-stream"):
                    async for chunk in client.generate(token_ids=[1, 2, 3]):
                        received.append(chunk)
        finally:
            await server.stop(0)
        return received

    received = asyncio.run(main())
    assert [c.token_ids for c in received] == [(7,)]
    assert log.methods() == ["Generate"] * 3  # two refusals retried; the failure after a token was not


def test_gives_up_after_max_attempts():
    log = CallLog()

    async def main():
        server, address = await _serve(FlakyEngine(refusals=100))
        try:
            async with AsyncClient(None, address, retry=FAST_RETRY, interceptors=log.interceptors) as client:
                with pytest.raises(UnavailableError, match="warming up"):
                    await client.complete(token_ids=[1])
        finally:
            await server.stop(0)

    asyncio.run(main())
    assert log.methods() == ["Generate"] * FAST_RETRY.max_attempts


def test_engine_still_loading_is_unavailable_to_the_sdk():
    async def main():
        server = EngineServer(EngineConfig(model="never-loaded"), ServerConfig(port=0))
        port = await server.start()  # bound and answering, model not loaded
        try:
            async with AsyncClient(None, f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=1)) as client:
                with pytest.raises(UnavailableError, match="loading"):
                    await client.model_info()
        finally:
            await server.stop(grace_s=0)

    asyncio.run(main())


def test_unreachable_services_are_named_with_how_to_start_them(capsys):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with Client(tokenizer=address, engine=address, timeout=10, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(UnavailableError) as err:
            client.encode("hi")
        assert str(err.value) == (
            f"cannot reach the tokenizer service at {address}: is it running? (`tokenwire-tokenizer` starts it)"
        )
        with pytest.raises(
            UnavailableError,
            match=re.escape(
                f"cannot reach the engine service at {address}: is it running? (`tokenwire-engine` starts it)"
            ),
        ):
            client.model_info()
    assert cli.main(["--tokenizer", address, "--engine", address, "info"]) == 1
    assert "cannot reach the engine service at" in capsys.readouterr().err


class TwoSampleEngine(engine_pb2_grpc.EngineServiceServicer):
    """Answers every request with two samples whose messages interleave, as the engine streams n = 2."""

    async def Generate(self, request, context):
        assert request.sampling.n == 2
        rid = request.request_id
        yield pb.GenerateResponse(request_id=rid, index=1, token_ids=[21], text="b")
        yield pb.GenerateResponse(request_id=rid, index=0, token_ids=[11], text="a")
        yield pb.GenerateResponse(
            request_id=rid,
            index=1,
            token_ids=[22],
            text="B",
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=3, completion_tokens=2, cached_prompt_tokens=1),
        )
        yield pb.GenerateResponse(
            request_id=rid,
            index=0,
            token_ids=[12, 13],
            text="AA",
            finish_reason=pb.FINISH_REASON_LENGTH,
            usage=pb.Usage(prompt_tokens=3, completion_tokens=3, cached_prompt_tokens=1),
        )

    async def GenerateBatch(self, request, context):
        results = []
        for r in request.requests:
            results += [
                pb.GenerateResponse(
                    request_id=r.request_id,
                    index=i,
                    token_ids=[i],
                    text=str(i),
                    finish_reason=pb.FINISH_REASON_STOP,
                    usage=pb.Usage(prompt_tokens=2, completion_tokens=1),
                )
                for i in range(r.sampling.n)
            ]
        return pb.GenerateBatchResponse(results=results)


def test_n_samples_chunks_carry_index_and_complete_gives_choices():
    async def main():
        server, address = await _serve(TwoSampleEngine())
        try:
            async with AsyncClient(None, address, retry=FAST_RETRY) as client:
                chunks = [c async for c in client.generate(token_ids=[1, 2, 3], n=2)]
                whole = await client.complete(token_ids=[1, 2, 3], n=2)
                batch = await client.complete_batch(token_ids=[[1, 2], [3, 4]], n=2)
        finally:
            await server.stop(0)
        return chunks, whole, batch

    chunks, whole, batch = asyncio.run(main())
    assert [(c.index, c.token_ids, c.finished) for c in chunks] == [
        (1, (21,), False),
        (0, (11,), False),
        (1, (22,), True),
        (0, (12, 13), True),
    ]
    assert [(c.index, c.text, c.token_ids) for c in whole.choices] == [(0, "aAA", (11, 12, 13)), (1, "bB", (21, 22))]
    assert (whole.text, whole.index) == ("aAA", 0)  # the completion itself is sample 0
    assert whole.usage == Usage(prompt_tokens=3, completion_tokens=5, cached_prompt_tokens=1)  # prompt once
    assert [[c.text for c in result.choices] for result in batch] == [["0", "1"], ["0", "1"]]
    assert [result.usage.completion_tokens for result in batch] == [2, 2]


def test_n1_completion_is_its_own_only_choice():
    completion = Completion(
        text="x", token_ids=(1,), finish_reason=FinishReason.STOP, usage=Usage(1, 1, 0), timings=None
    )
    assert completion.choices == (completion,) and Completion.of_samples([completion]) is completion

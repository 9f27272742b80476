"""Faults, with both services as subprocesses started by their console scripts (as docker-compose does):
a request that breaks inside the engine fails alone with INTERNAL; a broken batched step fails only
its batch; the tokenizer service dying leaves id requests working, makes text requests fail fast with
UnavailableError, and they work again once it is back on the same port; the engine dying mid-stream
ends the client's stream with an error, never a hang (every call carries a deadline as a safety net).

The in-engine failures use the engine's fault-injection switch (engine_service/core/faults.py), set only
for the engine started here: requests whose id starts with `poison-` fail in post-processing, and any
step holding a `crash-` request fails in the batched forward."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from tokenwire.client import Client, DeadlineExceededError, ServerError, TokenwireError, UnavailableError
from tokenwire.engine.config import CacheConfig, EngineConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.core.faults import ENV_VAR, FaultInjector, InjectedFault
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.serving.launcher import LocalServices, Service, start_service
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

from tests.reference import ENGINE_DTYPE

NUM_BLOCKS = 256
PROMPT = "The capital of France is"
FAST_FAIL_S = 5.0  # an unreachable service must be reported well within this
SAFETY_DEADLINE_S = 60  # no call here may hang: each one gives up by this deadline at the latest


@pytest.fixture(scope="module")
def services(tiny_llama_dir, tmp_path_factory):
    local = LocalServices(
        tiny_llama_dir,
        engine_args=["--dtype", ENGINE_DTYPE, "--num-blocks", str(NUM_BLOCKS)],
        log_dir=tmp_path_factory.mktemp("fault-logs"),
        ready_timeout_s=180,
    )
    with pytest.MonkeyPatch.context() as env:  # inherited by the subprocesses started here only
        env.setenv(ENV_VAR, "postprocess:poison-,forward:crash-")
        local.__enter__()
    yield local
    local.stop()


@pytest.fixture(scope="module")
def stub(services):
    with grpc.insecure_channel(services.engine_address) as channel:
        yield engine_pb2_grpc.EngineServiceStub(channel)


def ids_request(request_id: str, ids, n: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        token_ids=pb.TokenIds(ids=ids),
        sampling=pb.SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True),
    )


PROMPTS = [[5 + i, 17, 99, 1000 + i] for i in range(8)]


@pytest.fixture(scope="module")
def reference(stub) -> list[list[int]]:
    return [
        _tokens(stub.Generate(ids_request(f"ref-{i}", ids), timeout=SAFETY_DEADLINE_S)) for i, ids in enumerate(PROMPTS)
    ]


def test_a_request_failing_in_postprocessing_fails_alone(services, reference):
    requests = [ids_request(f"ok-{i}", ids) for i, ids in enumerate(PROMPTS)]
    requests.insert(3, ids_request("poison-1", PROMPTS[0]))
    results = asyncio.run(_run_concurrently(services.engine_address, requests))
    poisoned = results.pop(3)
    assert poisoned[0] == grpc.StatusCode.INTERNAL and "post-processing failed" in poisoned[1]
    assert results == [(grpc.StatusCode.OK, tokens) for tokens in reference]  # the others, untouched
    _assert_idle(services)


def test_a_failing_step_fails_its_batch_and_the_engine_serves_on(services, stub, reference):
    requests = [ids_request(f"ok2-{i}", ids) for i, ids in enumerate(PROMPTS)] + [ids_request("crash-1", [1, 2])]
    results = asyncio.run(_run_concurrently(services.engine_address, requests))
    assert results[-1][0] == grpc.StatusCode.INTERNAL and "engine step failed" in results[-1][1]
    for (code, tokens), expected in zip(results[:-1], reference):  # sharing its step, or done before it
        assert code == grpc.StatusCode.INTERNAL or (code, tokens) == (grpc.StatusCode.OK, expected)
    _assert_idle(services)
    again = [
        _tokens(stub.Generate(ids_request(f"after-{i}", ids), timeout=SAFETY_DEADLINE_S))
        for i, ids in enumerate(PROMPTS)
    ]
    assert again == reference


def test_tokenizer_down_ids_still_work_text_fails_fast_then_recovers(services, reference):
    greedy_ids = dict(token_ids=PROMPTS[0], max_new_tokens=8, temperature=0.0, ignore_eos=True)
    with Client(services.tokenizer_address, services.engine_address, timeout=SAFETY_DEADLINE_S) as client:
        before = client.complete(PROMPT, max_new_tokens=6, temperature=0.0)
        ids_before = client.complete(**greedy_ids)
        _kill(services.tokenizer)

        with Client(tokenizer=None, engine=services.engine_address, timeout=SAFETY_DEADLINE_S) as engine_only:
            assert list(engine_only.complete(**greedy_ids).token_ids) == reference[0]
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            client.complete(PROMPT, max_new_tokens=6, temperature=0.0)
        assert time.monotonic() - start < FAST_FAIL_S  # a few quick retries with backoff, then the error
        # The same client's id requests go on: with its tokenizer unreachable, the engine sends the text.
        ids_during = client.complete(**greedy_ids)
        assert (ids_during.token_ids, ids_during.text) == (ids_before.token_ids, ids_before.text)
        assert list(ids_during.token_ids) == reference[0]

        services.tokenizer = _respawn(services.tokenizer, services.model)
        client.wait_ready(timeout=SAFETY_DEADLINE_S)
        after = client.complete(PROMPT, max_new_tokens=6, temperature=0.0)
        assert (after.text, after.token_ids) == (before.text, before.token_ids)


def test_engine_killed_mid_stream_ends_the_stream_with_an_error(services):
    with Client(services.tokenizer_address, services.engine_address, timeout=SAFETY_DEADLINE_S) as client:
        stream = client.generate(PROMPT, max_new_tokens=4000, ignore_eos=True)
        assert next(stream).token_ids
        _kill(services.engine)
        start = time.monotonic()
        with pytest.raises(TokenwireError) as err:
            for _ in stream:
                pass
        assert not isinstance(err.value, DeadlineExceededError)  # it failed; the safety net never fired
        assert isinstance(err.value, (UnavailableError, ServerError))
        assert time.monotonic() - start < FAST_FAIL_S
        with pytest.raises(UnavailableError):  # and new calls fail fast too
            client.complete(PROMPT, max_new_tokens=2, timeout=FAST_FAIL_S)


# ---- in process: the switch itself, and the offline API ----


def test_fault_switch_is_off_unless_set_and_strict_about_its_format():
    assert FaultInjector.from_env({}) is None
    injector = FaultInjector.from_env({ENV_VAR: "postprocess:poison-"})
    injector.check("postprocess", ["ok-1"])
    with pytest.raises(InjectedFault):
        injector.check("postprocess", ["ok-1", "poison-2"])
    injector.check("forward", ["poison-2"])  # another stage: no fault
    for bad in ("poison-", "decode:x", "forward:"):
        with pytest.raises(ValueError, match=ENV_VAR):
            FaultInjector.parse(bad)


def test_offline_generate_raises_on_a_failed_request_and_leaves_the_engine_clean(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "postprocess:poison-")
    engine = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=32)))
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add(engine.prepare(prompt_token_ids=[1, 2, 3], params=params, request_id="poison-1"))
    with pytest.raises(RuntimeError, match="poison-1 failed"):
        engine.generate(prompt_token_ids=[[4, 5, 6]], params=params)
    stats = engine.stats()
    assert not engine.has_unfinished() and stats.num_free_kv_blocks == stats.num_kv_blocks
    assert len(engine.generate(prompt_token_ids=[[4, 5, 6]], params=params)[0]) == 4


# ---- helpers ----


async def _run_concurrently(address: str, requests: list[pb.GenerateRequest]):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)

        async def one(request):
            try:
                return grpc.StatusCode.OK, [
                    t async for r in stub.Generate(request, timeout=SAFETY_DEADLINE_S) for t in r.token_ids
                ]
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details()

        return list(await asyncio.gather(*(one(r) for r in requests)))


def _assert_idle(services) -> None:
    with Client(tokenizer=None, engine=services.engine_address, timeout=SAFETY_DEADLINE_S) as client:
        end = time.monotonic() + 10
        while True:
            stats = client.model_info().stats
            if stats.num_active_requests == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks:
                break
            assert time.monotonic() < end, stats
            time.sleep(0.01)
        assert (stats.num_running, stats.num_waiting) == (0, 0)


def _kill(service: Service) -> None:
    service.process.send_signal(signal.SIGKILL)
    service.process.wait(10)


def _respawn(service: Service, model: str) -> Service:
    """The same service on the same address, as a restarting container would come back."""
    host, port = service.address.rsplit(":", 1)
    return start_service(service.name, ["--model", model], host=host, port=int(port), log_dir=service.log_path.parent)


def _tokens(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]

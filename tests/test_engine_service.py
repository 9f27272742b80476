"""The engine's gRPC service, in-process on port 0 with the tiny Llama: the wire contract of Generate,
GenerateBatch and GetModelInfo, cancellation, concurrency, health and reflection."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.engine.edge.server import SERVICE_NAME, EngineServer
from tokenwire.engine.edge.servicer import FIELD_METADATA_KEY
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

NUM_BLOCKS = 256
GREEDY = dict(temperature=0.0)


class ServerThread:
    """An EngineServer on its own event-loop thread, so tests can use plain blocking stubs."""

    def __init__(self, config: EngineConfig, load: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: EngineServer = self.run(_make_server(config))
        self.port = self.run(self.server.start())
        if load:
            self.run(self.server.load())

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


async def _make_server(config: EngineConfig) -> EngineServer:
    return EngineServer(config, ServerConfig(host="127.0.0.1", port=0))


@pytest.fixture(scope="module")
def config(tiny_llama_dir) -> EngineConfig:
    # float32 pinned: "auto" may pick bf16 on some CPUs, and greedy ids are compared with transformers fp32.
    # fp32 pinned: these tests hold the service's ids and text token-exact against transformers.
    return EngineConfig(model=tiny_llama_dir, dtype="float32", cache=CacheConfig(num_blocks=NUM_BLOCKS))


@pytest.fixture(scope="module")
def server(config):
    thread = ServerThread(config)
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> engine_pb2_grpc.EngineServiceStub:
    return engine_pb2_grpc.EngineServiceStub(channel)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def ids_request(ids, **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(**sampling))


def stats(stub) -> pb.EngineStats:
    return stub.GetModelInfo(pb.GetModelInfoRequest()).stats


def wait_until_idle(stub, timeout: float = 10.0) -> pb.EngineStats:
    """The engine aborts a cancelled request at its next step: poll the stats until it has."""
    end = time.monotonic() + timeout
    while True:
        current = stats(stub)
        idle = current.num_running == current.num_waiting == 0
        if (idle and current.num_free_kv_blocks == current.num_kv_blocks) or time.monotonic() > end:
            return current
        time.sleep(0.01)


# ---- prompts: ids are never encoded, text exactly once ----


def test_ids_are_never_encoded_text_once(stub, tokenizer):
    before = stats(stub).num_prompt_encodes
    ids = tokenizer.encode("The capital of France is")
    responses = list(stub.Generate(ids_request(ids, max_new_tokens=4, **GREEDY)))
    assert stats(stub).num_prompt_encodes == before
    assert responses[-1].usage.prompt_tokens == len(ids)

    text_responses = list(
        stub.Generate(
            pb.GenerateRequest(text="The capital of France is", sampling=pb.SamplingParams(max_new_tokens=4, **GREEDY))
        )
    )
    assert stats(stub).num_prompt_encodes == before + 1
    assert _ids(text_responses) == _ids(responses)


def test_stream_matches_transformers_and_ends_once(stub, tokenizer, hf_model):
    ids = tokenizer.encode("Once upon a time")
    responses = list(
        stub.Generate(
            pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=ids),
                return_text=True,
                sampling=pb.SamplingParams(max_new_tokens=12, **GREEDY),
            )
        )
    )
    expected = hf_greedy(hf_model, ids, 12)
    assert _ids(responses) == expected
    assert "".join(r.text for r in responses) == tokenizer.decode(expected, skip_special_tokens=True)
    finals = [r for r in responses if r.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert finals == responses[-1:]
    final = responses[-1]
    assert final.usage.completion_tokens == len(expected)
    assert final.timings.HasField("time_to_first_token_s") and final.timings.HasField("queue_wait_s")
    assert 0 <= final.timings.queue_wait_s <= final.timings.time_to_first_token_s <= final.timings.total_s


def test_logprobs_when_asked(stub, tokenizer):
    responses = list(stub.Generate(ids_request(tokenizer.encode("Hello"), max_new_tokens=5, logprobs=3, **GREEDY)))
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == _ids(responses)
    for lp in logprobs:
        assert len(lp.top) == 3 and lp.top[0].token_id == lp.token_id  # greedy picks the most likely
        assert lp.logprob <= 0 and lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob
    plain = list(stub.Generate(ids_request(tokenizer.encode("Hello"), max_new_tokens=5, **GREEDY)))
    assert not any(r.logprobs for r in plain)


# ---- refusals: a precise status before any work ----


def test_fingerprint_mismatch_is_failed_precondition(stub, tokenizer):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    before = info.stats.num_prompt_encodes
    ok = ids_request(tokenizer.encode("Hi"), max_new_tokens=2)
    ok.tokenizer_fingerprint = info.tokenizer_fingerprint
    assert list(stub.Generate(ok))[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED

    for request in (ids_request([1, 2, 3]), pb.GenerateRequest(text="Hi")):
        request.tokenizer_fingerprint = "0" * 64
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tokenizer_fingerprint" in err.value.details()
    assert stats(stub).num_prompt_encodes == before  # refused before the text was encoded


@pytest.mark.parametrize(
    "request_, field",
    [
        (ids_request([1, 2], temperature=-1.0), "sampling.temperature"),
        (ids_request([1, 2], top_p=0.0), "sampling.top_p"),
        (ids_request([1, 2], max_new_tokens=0), "sampling.max_new_tokens"),
        (ids_request([1, 2], logprobs=999), "sampling.logprobs"),
        (ids_request([1, 2], stop_token_ids=[10**9]), "sampling.stop_token_ids"),
        (ids_request([1, 10**9]), "token_ids.ids"),
        (ids_request([]), "token_ids.ids"),
        (ids_request([1] * 5000), "token_ids.ids"),  # longer than the context
        (pb.GenerateRequest(text=""), "text"),
        (pb.GenerateRequest(), "prompt"),
    ],
)
def test_bad_fields_are_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")
    assert (FIELD_METADATA_KEY, field) in tuple(err.value.trailing_metadata())


def test_duplicate_request_id_in_flight_is_refused(stub):
    request = ids_request([1, 2, 3], max_new_tokens=1000, ignore_eos=True)
    request.request_id = "same-id"
    first = stub.Generate(request)
    assert next(first).request_id == "same-id"
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()
    wait_until_idle(stub)


def test_an_id_reused_right_after_its_cancel_is_refused_or_served_never_aborted(stub):
    """The cancelled request's ABORT is still on its way back from the core when the id comes again: it
    must not land on the new request (it used to, as UNAVAILABLE "the engine is shutting down")."""
    request = ids_request([1, 2, 3], max_new_tokens=1000, ignore_eos=True)
    request.request_id = "reused-id"
    reuse = ids_request([4, 5, 6], max_new_tokens=8, ignore_eos=True)
    reuse.request_id = "reused-id"
    refused = 0
    for _ in range(10):
        first = stub.Generate(request)
        next(first)
        first.cancel()
        while True:  # ALREADY_EXISTS while the abort is in flight, then served in full
            try:
                responses = list(stub.Generate(reuse))
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.ALREADY_EXISTS, err.details()
                assert err.details().startswith("request_id: 'reused-id' is ")
                refused += 1
        assert sum(len(r.token_ids) for r in responses) == 8
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    after = wait_until_idle(stub)
    assert (after.num_running, after.num_free_kv_blocks) == (0, NUM_BLOCKS)


# ---- cancellation and deadlines free the request's blocks ----


def test_cancel_mid_stream_frees_blocks(stub):
    stream = stub.Generate(ids_request(list(range(10, 60)), max_new_tokens=1000, ignore_eos=True))
    received = [next(stream) for _ in range(3)]
    assert all(r.token_ids for r in received)
    held = stats(stub)
    assert held.num_running == 1 and held.num_free_kv_blocks < held.num_kv_blocks
    stream.cancel()
    after = wait_until_idle(stub)
    assert (after.num_running, after.num_free_kv_blocks) == (0, NUM_BLOCKS)
    assert after.num_active_requests == 0


def test_deadline_aborts_the_request(stub):
    stream = stub.Generate(ids_request(list(range(10, 60)), max_new_tokens=1000, ignore_eos=True), timeout=0.3)
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = wait_until_idle(stub)
    assert (after.num_running, after.num_free_kv_blocks) == (0, NUM_BLOCKS)


# ---- concurrency and the batch form ----


def test_32_concurrent_streams_all_finish_correctly(server, hf_model):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.randrange(4, 40))] for _ in range(32)]
    lengths = [rng.randrange(4, 16) for _ in prompts]

    async def one(stub, ids, n):
        return [r async for r in stub.Generate(ids_request(ids, max_new_tokens=n, **GREEDY))]

    async def run_all():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            return await asyncio.gather(*(one(stub, ids, n) for ids, n in zip(prompts, lengths)))

    streams = asyncio.run(run_all())
    for ids, n, responses in zip(prompts, lengths, streams):
        expected = hf_greedy(hf_model, ids, n)
        assert _ids(responses) == expected
        assert responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert responses[-1].usage.completion_tokens == len(expected)
        assert len({r.request_id for r in responses}) == 1


def test_generate_batch_returns_results_in_order(stub):
    lengths = [7, 1, 12, 3, 9]
    requests = [ids_request([5 + i, 6, 7], max_new_tokens=n, ignore_eos=True, **GREEDY) for i, n in enumerate(lengths)]
    requests[1].return_text = True
    results = stub.GenerateBatch(pb.GenerateBatchRequest(requests=requests)).results
    assert [len(r.token_ids) for r in results] == lengths
    assert [r.usage.completion_tokens for r in results] == lengths
    assert all(r.finish_reason == pb.FINISH_REASON_LENGTH for r in results)
    assert results[1].text and not results[0].text
    assert list(results[2].token_ids) == _ids(list(stub.Generate(requests[2])))


def test_generate_batch_names_the_bad_request(stub):
    requests = [ids_request([1, 2], max_new_tokens=2) for _ in range(3)]
    requests[2].sampling.temperature = -1.0
    with pytest.raises(grpc.RpcError) as err:
        stub.GenerateBatch(pb.GenerateBatchRequest(requests=requests))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("requests[2].sampling.temperature: ")
    assert wait_until_idle(stub).num_active_requests == 0  # nothing of the batch was started


# ---- model info, health, reflection, lifecycle ----


def test_model_info(stub, config):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model, info.architecture) == (config.model, "LlamaForCausalLM")
    assert (info.vocab_size, info.max_model_len, list(info.eos_token_ids)) == (49152, 1024, [2])
    assert len(info.tokenizer_fingerprint) == 64
    assert (info.config.num_kv_blocks, info.config.block_size, info.config.dtype) == (NUM_BLOCKS, 16, "float32")
    assert info.config.max_num_seqs == config.scheduler.max_num_seqs
    assert info.config.kv_cache_dtype == "float32"
    assert info.config.model_impl == "native"


def test_a_bfloat16_kv_cache_is_reported_and_serves(config, tokenizer, hf_model):
    """`--kv-cache-dtype bfloat16` under the fp32 model: GetModelInfo says so, ids stream without an encode,
    the first greedy token (from the prompt's own fp32 K/V) is transformers', and every block comes back."""
    narrow = dataclasses.replace(config, cache=dataclasses.replace(config.cache, kv_cache_dtype="bfloat16"))
    thread = ServerThread(narrow)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{thread.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            assert (info.config.dtype, info.config.kv_cache_dtype) == ("float32", "bfloat16")
            ids = tokenizer.encode("The capital of France is")
            got = _ids(list(stub.Generate(ids_request(ids, max_new_tokens=6, **GREEDY))))
            assert len(got) == 6 and got[0] == hf_greedy(hf_model, ids, 1)[0]
            idle = wait_until_idle(stub)
            assert idle.num_prompt_encodes == 0 and idle.num_free_kv_blocks == idle.num_kv_blocks
    finally:
        thread.close()


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}


def test_not_serving_while_loading_and_draining(config):
    thread = ServerThread(config, load=False)
    with grpc.insecure_channel(f"127.0.0.1:{thread.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(ids_request([1, 2])))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()

        thread.run(thread.server.load())
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        running = stub.Generate(ids_request([1, 2, 3], max_new_tokens=1000, ignore_eos=True))
        next(running)
        stopping = asyncio.run_coroutine_threadsafe(thread.server.stop(grace_s=60), thread.loop)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert any(r.status == health_pb2.HealthCheckResponse.NOT_SERVING for r in watch)  # draining
        watch.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(ids_request([1, 2])))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
        assert next(running).token_ids  # the in-flight request keeps going while draining
        running.cancel()  # ...and once it is gone the drain completes
        stopping.result(timeout=30)
    thread.loop.call_soon_threadsafe(thread.loop.stop)
    thread.thread.join()


def _ids(responses) -> list[int]:
    return [t for r in responses for t in r.token_ids]


# ---- parallel samples: n and index ----


def _by_index(responses) -> dict[int, list]:
    samples: dict[int, list] = {}
    for r in responses:
        samples.setdefault(r.index, []).append(r)
    return samples


def test_n_samples_stream_with_index_and_usage(stub):
    request = ids_request(list(range(20, 37)), max_new_tokens=6, temperature=1.0, seed=11, ignore_eos=True, n=3)
    request.request_id = "n-three"
    responses = list(stub.Generate(request))
    samples = _by_index(responses)
    assert sorted(samples) == [0, 1, 2] and {r.request_id for r in responses} == {"n-three"}
    for messages in samples.values():
        finals = [m for m in messages if m.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
        assert finals == [messages[-1]]
        assert finals[0].usage.prompt_tokens == 17 and finals[0].usage.completion_tokens == 6
        assert len(_ids(messages)) == 6
    ids = {i: _ids(m) for i, m in samples.items()}
    assert len({tuple(v) for v in ids.values()}) > 1
    request.request_id = ""
    assert {i: _ids(m) for i, m in _by_index(stub.Generate(request)).items()} == ids  # seeded: reproducible
    one = ids_request(list(range(20, 37)), max_new_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    assert _ids(list(stub.Generate(one))) == ids[0]  # sample 0 is the n = 1 answer
    assert all(r.index == 0 for r in stub.Generate(one))


def test_n_out_of_range_is_invalid_argument_naming_sampling_n(stub):
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(ids_request([1, 2, 3], n=17)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.n: ")
    assert (FIELD_METADATA_KEY, "sampling.n") in tuple(err.value.trailing_metadata())


def test_n_samples_cancel_frees_every_sample(stub):
    stream = stub.Generate(ids_request(list(range(10, 60)), max_new_tokens=1000, ignore_eos=True, n=4))
    seen = set()
    while seen != {0, 1, 2, 3}:
        seen.add(next(stream).index)
    assert stats(stub).num_running == 4
    stream.cancel()
    after = wait_until_idle(stub)
    assert (after.num_running, after.num_waiting, after.num_free_kv_blocks) == (0, 0, NUM_BLOCKS)


def test_generate_batch_gives_one_result_per_sample(stub):
    requests = [
        ids_request([5, 6, 7], max_new_tokens=4, ignore_eos=True, seed=1, n=2),
        ids_request([8, 9], max_new_tokens=3, ignore_eos=True, **GREEDY),
    ]
    results = stub.GenerateBatch(pb.GenerateBatchRequest(requests=requests)).results
    assert [(len(r.token_ids), r.index) for r in results] == [(4, 0), (4, 1), (3, 0)]
    assert len({r.request_id for r in results}) == 2


def test_sdk_n_samples_against_the_engine(server, stub):
    from tokenwire.client import AsyncClient

    options = dict(max_new_tokens=5, temperature=1.0, seed=5, ignore_eos=True, n=2)

    async def main():
        async with AsyncClient(None, f"127.0.0.1:{server.port}") as client:
            chunks = [c async for c in client.generate(token_ids=list(range(40, 52)), **options)]
            return chunks, await client.complete(token_ids=list(range(40, 52)), **options)

    chunks, whole = asyncio.run(main())
    wire = {i: _ids(m) for i, m in _by_index(stub.Generate(ids_request(list(range(40, 52)), **options))).items()}
    streamed = {i: [t for c in chunks if c.index == i for t in c.token_ids] for i in (0, 1)}
    assert streamed == wire == {c.index: list(c.token_ids) for c in whole.choices}
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (12, 10)

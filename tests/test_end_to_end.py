"""The whole system: both services as subprocesses, started with the same commands docker-compose uses
(`tokenwire-tokenizer ...`, `tokenwire-engine ...`) on free ports, driven through the SDK and the CLI.
One pair of services for the module keeps this file fast."""

from __future__ import annotations

import asyncio
import subprocess
import time

import grpc
import pytest
import torch
from tokenwire.client import AsyncClient, Client, DeadlineExceededError, InvalidRequestError, StopDetail, StopKind
from tokenwire.serving.launcher import LocalServices, command
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.rpc_log import CallLog

NUM_BLOCKS = 256
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def services(tiny_llama_dir, tmp_path_factory):
    # float32 pinned: "auto" may pick bf16 on some CPUs, and greedy output is compared with transformers fp32.
    # fp32 pinned: the streamed ids are held token-exact against transformers.
    local = LocalServices(
        tiny_llama_dir,
        engine_args=["--dtype", "float32", "--num-blocks", str(NUM_BLOCKS)],
        log_dir=tmp_path_factory.mktemp("service-logs"),
        ready_timeout_s=180,
    )
    with local:
        yield local
    assert local.exit_codes == {"tokenwire-engine": 0, "tokenwire-tokenizer": 0}  # a clean SIGTERM drain


@pytest.fixture(scope="module")
def client(services):
    with Client(services.tokenizer_address, services.engine_address, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def engine_encodes(client: Client) -> int:
    return client.model_info().stats.num_prompt_encodes


def wait_until_idle(client: Client, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while True:
        stats = client.model_info().stats
        if (stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks) or time.monotonic() > end:
            return stats
        time.sleep(0.01)


def test_sdk_text_is_encoded_once_by_the_tokenizer_and_never_by_the_engine(services, client):
    before = engine_encodes(client)
    log = CallLog()
    with Client(services.tokenizer_address, services.engine_address, interceptors=log.interceptors) as logged:
        text = "".join(chunk.text for chunk in logged.generate(PROMPT, max_new_tokens=8, temperature=0.0))
    assert text
    assert log.methods().count("Encode") == 1 and log.methods().count("Generate") == 1
    (generate,) = [call.request for call in log.calls if call.method == "Generate"]
    assert generate.WhichOneof("prompt") == "token_ids" and generate.tokenizer_fingerprint
    assert generate.return_text and "DecodeStream" not in log.methods()  # the default: the engine's text
    assert engine_encodes(client) == before
    # One id for the whole call, on every RPC it made (so both services' logs of it line up).
    call_ids = {call.metadata.get("x-request-id") for call in log.calls}
    assert call_ids == {generate.request_id}


def test_text_sent_straight_to_the_engine_is_encoded_once_there(services, client):
    before = engine_encodes(client)
    with Client(tokenizer=None, engine=services.engine_address) as engine_only:
        direct = engine_only.complete(PROMPT, max_new_tokens=8, temperature=0.0)
    assert engine_encodes(client) == before + 1
    assert direct.text == client.complete(PROMPT, max_new_tokens=8, temperature=0.0).text


def test_text_through_decode_stream_is_the_same_text(services, client):
    """text_from="tokenizer" decodes through the tokenizer service's DecodeStream instead of taking the
    engine's text (the default): the same text either way, and still encoded once."""
    before = engine_encodes(client)
    log = CallLog()
    with Client(
        services.tokenizer_address, services.engine_address, interceptors=log.interceptors, text_from="tokenizer"
    ) as via_tokenizer:
        chunks = list(via_tokenizer.generate(PROMPT, max_new_tokens=12, temperature=0.0))
    assert "DecodeStream" in log.methods() and log.methods().count("Encode") == 1
    (generate,) = [call.request for call in log.calls if call.method == "Generate"]
    assert not generate.return_text
    assert engine_encodes(client) == before  # text is still encoded once, by the tokenizer service
    expected = "".join(c.text for c in client.generate(PROMPT, max_new_tokens=12, temperature=0.0))
    assert "".join(c.text for c in chunks) == expected
    with pytest.raises(ValueError, match="text_from"):
        Client(services.tokenizer_address, services.engine_address, text_from="both")


def test_greedy_text_equals_transformers_generate(client, hf):
    model, tokenizer = hf
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected_ids = model.generate(prompt_ids, max_new_tokens=16, do_sample=False)[0, prompt_ids.shape[1] :]
    expected = tokenizer.decode(expected_ids, skip_special_tokens=True)

    chunks = list(client.generate(PROMPT, max_new_tokens=16, temperature=0.0))
    assert [t for c in chunks for t in c.token_ids] == expected_ids.tolist()
    assert "".join(c.text for c in chunks) == expected
    assert [c.finished for c in chunks].count(True) == 1 and chunks[-1].finished
    assert chunks[-1].usage.prompt_tokens == prompt_ids.shape[1]
    assert client.complete(PROMPT, max_new_tokens=16, temperature=0.0).text == expected


def test_stop_strings_cut_the_text(client):
    full = client.complete(PROMPT, max_new_tokens=16, temperature=0.0).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    chunks = list(client.generate(PROMPT, max_new_tokens=16, temperature=0.0, stop=[stop]))
    assert "".join(c.text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].finish_reason.value == "stop"


def test_the_final_chunk_says_which_stop_ended_it(client):
    """The stop detail, through the gRPC contract and the SDK: a stop string, a stop token id, eos
    (forced by a logit_bias on the eos id), and none for a length finish."""
    full = client.complete(PROMPT, max_new_tokens=16, temperature=0.0)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    by_string = list(client.generate(PROMPT, max_new_tokens=16, temperature=0.0, stop=["\x00never", stop]))[-1]
    assert by_string.stop == StopDetail(StopKind.STRING, stop_string=stop) and by_string.stop.matched == stop
    third = full.token_ids[2]
    by_id = client.complete(PROMPT, max_new_tokens=16, temperature=0.0, stop_token_ids=[third])
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(third) + 1]
    assert by_id.stop == StopDetail(StopKind.TOKEN_ID, token_id=third) and by_id.stop.matched == third
    eos = client.model_info().eos_token_ids[0]
    by_eos = list(client.generate(PROMPT, max_new_tokens=16, temperature=0.0, logit_bias={eos: 100.0}))[-1]
    assert by_eos.token_ids == (eos,) and by_eos.finish_reason.value == "stop"
    assert by_eos.stop == StopDetail(StopKind.EOS, token_id=eos) and by_eos.stop.matched is None
    assert full.finish_reason.value == "length" and full.stop is None


def test_logit_bias_reaches_the_batched_sampler(client):
    target = 42
    biased = client.complete(PROMPT, max_new_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={target: 100})
    assert biased.token_ids == (target,) * 4
    seeded = dict(max_new_tokens=6, temperature=1.0, seed=5, logit_bias={"7": -3.5, 9: 2.0})
    assert client.complete(PROMPT, **seeded).token_ids == client.complete(PROMPT, **seeded).token_ids


@pytest.mark.parametrize(
    "bias, message",
    [
        ({i: 1.0 for i in range(301)}, "at most 300"),
        ({5: 100.5}, "values must be in"),
        ({10**7: 1.0}, "outside the vocabulary"),
    ],
)
def test_a_bad_logit_bias_is_invalid_argument_naming_the_field(client, bias, message):
    with pytest.raises(InvalidRequestError, match=message) as err:
        client.complete(PROMPT, max_new_tokens=2, logit_bias=bias)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "sampling.logit_bias"


def test_chat_uses_the_models_chat_template(client, hf):
    _, tokenizer = hf
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    expected_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert client.apply_chat_template(messages) == list(getattr(expected_ids, "input_ids", expected_ids))
    streamed = "".join(c.text for c in client.chat(messages, max_new_tokens=8, temperature=0.0))
    assert streamed == client.complete(messages=messages, max_new_tokens=8, temperature=0.0).text


def test_fingerprint_mismatch_is_failed_precondition(services):
    with grpc.insecure_channel(services.engine_address) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), tokenizer_fingerprint="f" * 64)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cancelling_a_stream_frees_its_blocks(client):
    chunks = client.generate(PROMPT, max_new_tokens=1000, ignore_eos=True, temperature=0.0)
    received = [next(chunks) for _ in range(3)]
    assert all(c.token_ids for c in received)
    assert client.model_info().stats.num_free_kv_blocks < NUM_BLOCKS
    chunks.close()  # leaving the stream cancels the RPC
    stats = wait_until_idle(client)
    assert (stats.num_running, stats.num_free_kv_blocks) == (0, NUM_BLOCKS)


def test_sdk_errors_are_typed(client):
    with pytest.raises(InvalidRequestError) as err:
        list(client.generate(PROMPT, temperature=-1.0))
    assert err.value.field == "sampling.temperature"
    with pytest.raises(DeadlineExceededError):
        list(client.generate(PROMPT, max_new_tokens=1000, ignore_eos=True, timeout=0.3))
    assert wait_until_idle(client).num_free_kv_blocks == NUM_BLOCKS


def test_32_concurrent_streams_all_finish_correctly(services, client):
    prompts = [f"Story {i}: once upon a time there was" for i in range(32)]
    expected = client.complete_batch(prompts, max_new_tokens=12, temperature=0.0)

    async def stream_all():
        async with AsyncClient(services.tokenizer_address, services.engine_address, timeout=120) as aclient:

            async def one(prompt):
                return [c async for c in aclient.generate(prompt, max_new_tokens=12, temperature=0.0)]

            return await asyncio.gather(*(one(p) for p in prompts))

    for chunks, want in zip(asyncio.run(stream_all()), expected):
        assert chunks[-1].finished and [c.finished for c in chunks].count(True) == 1
        assert tuple(t for c in chunks for t in c.token_ids) == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
    assert wait_until_idle(client).num_running == 0


def test_cli_generate_and_chat(services, client):
    addresses = ["--tokenizer", services.tokenizer_address, "--engine", services.engine_address]
    sampling = ["--max-new-tokens", "8", "--temperature", "0"]
    expected = client.complete(PROMPT, max_new_tokens=8, temperature=0.0).text
    run = subprocess.run(
        command("tokenwire") + addresses + ["generate", PROMPT] + sampling, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert "completion tokens" in run.stderr

    run = subprocess.run(
        command("tokenwire") + addresses + ["generate", PROMPT, "--ids"] + sampling,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "prompt ids: [" in run.stderr and run.stdout.startswith("[")

    reply = client.complete(messages=[{"role": "user", "content": "Hello"}], max_new_tokens=8, temperature=0.0)
    run = subprocess.run(
        command("tokenwire") + addresses + ["chat"] + sampling,
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"assistant> {reply.text}\n"

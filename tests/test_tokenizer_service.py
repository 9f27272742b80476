"""The tokenizer service over real gRPC (in-process grpc.aio servers on port 0, blocking client stubs):
results equal the in-process transformers tokenizer, streams equal one-shot decodes, bad input is
INVALID_ARGUMENT naming the field, health follows loading, reflection lists the service."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenwire.bench import tokenizer as tokenizer_bench
from tokenwire.client import Client, NoChatTemplateError
from tokenwire.serving.errors import REASON_METADATA_KEY, REASON_NO_CHAT_TEMPLATE
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.tokenizer.server import SERVICE_NAME, TokenizerServer
from tokenwire.tokenizer.tokenizer import tokenizer_fingerprint
from tokenwire.v1 import common_pb2, tokenizer_pb2_grpc
from tokenwire.v1 import tokenizer_pb2 as pb
from transformers import AutoTokenizer

from tests.test_detokenizer import CORPUS, build_byte_fallback_tokenizer

MAX_BATCH = 64
MAX_PUSH = 256


class ServerThread:
    """A TokenizerServer on its own event-loop thread, so tests can use plain blocking stubs."""

    def __init__(self, config: TokenizerServiceConfig, tokenizer=None, load: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: TokenizerServer = self.run(self._make(config))
        self.port = self.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = tokenizer_pb2_grpc.TokenizerServiceStub(self.channel)
        if load:
            self.run(self.server.load(tokenizer))

    @staticmethod
    async def _make(config: TokenizerServiceConfig) -> TokenizerServer:
        return TokenizerServer(config)  # built on the loop that will run it

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(scope="module")
def config(smollm2_dir) -> TokenizerServiceConfig:
    return TokenizerServiceConfig(
        model=smollm2_dir, host="127.0.0.1", port=0, max_batch_size=MAX_BATCH, max_stream_push_ids=MAX_PUSH
    )


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def service(config):
    server = ServerThread(config)  # loads the tokenizer from disk itself
    yield server
    server.close()


@pytest.fixture(scope="module")
def stub(service):
    return service.stub


# --- results equal transformers ------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_equals_transformers(stub, reference, add_special_tokens):
    for text in CORPUS:
        response = stub.Encode(pb.EncodeRequest(text=text, add_special_tokens=add_special_tokens))
        assert list(response.ids) == reference(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert not response.truncated
    assert list(stub.Encode(pb.EncodeRequest(text=CORPUS[6])).ids) == reference(CORPUS[6])["input_ids"]


def test_batch_encode_equals_transformers(stub, reference):
    texts = CORPUS * 8  # > inline_work_limit characters: runs on a worker thread
    response = stub.BatchEncode(pb.BatchEncodeRequest(texts=texts))
    assert [list(e.ids) for e in response.encodings] == reference(texts)["input_ids"]
    assert stub.BatchEncode(pb.BatchEncodeRequest()).encodings == []


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_equals_transformers(stub, reference, side):
    enum = {"right": pb.TRUNCATION_SIDE_RIGHT, "left": pb.TRUNCATION_SIDE_LEFT}[side]
    reference.truncation_side = side
    try:
        for max_length in (1, 3, 10, 1000):
            expected = reference(CORPUS, truncation=True, max_length=max_length)["input_ids"]
            request = pb.BatchEncodeRequest(texts=CORPUS, max_length=max_length, truncation_side=enum)
            batch = stub.BatchEncode(request)
            assert [list(e.ids) for e in batch.encodings] == expected
            too_long = [len(reference(t)["input_ids"]) > max_length for t in CORPUS]
            assert [e.truncated for e in batch.encodings] == too_long
            single = stub.Encode(pb.EncodeRequest(text=CORPUS[0], max_length=max_length, truncation_side=enum))
            assert list(single.ids) == expected[0]
    finally:
        reference.truncation_side = "right"


@pytest.mark.parametrize("skip", [True, False])
def test_decode_equals_transformers(stub, reference, skip):
    for text in CORPUS:
        ids = reference(text)["input_ids"]
        response = stub.Decode(pb.DecodeRequest(ids=ids, skip_special_tokens=skip))
        assert response.text == reference.decode(ids, skip_special_tokens=skip)


def test_chat_template_equals_transformers(stub, reference):
    roles = {
        "system": common_pb2.CHAT_ROLE_SYSTEM,
        "user": common_pb2.CHAT_ROLE_USER,
        "assistant": common_pb2.CHAT_ROLE_ASSISTANT,
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Héllo 🤗 世界"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "2+2?"},
    ]
    for conversation in (messages, messages[1:2]):
        for generation_prompt in (True, False):
            request = pb.ApplyChatTemplateRequest(
                messages=[common_pb2.ChatMessage(role=roles[m["role"]], content=m["content"]) for m in conversation],
                add_generation_prompt=generation_prompt,
                return_text=True,
            )
            response = stub.ApplyChatTemplate(request)
            expected = reference.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
            assert list(response.ids) == expected["input_ids"]
            assert response.text == reference.apply_chat_template(
                conversation, add_generation_prompt=generation_prompt, tokenize=False
            )
    request.return_text = False
    assert stub.ApplyChatTemplate(request).text == ""


def test_get_info(stub, reference):
    info = stub.GetInfo(pb.GetInfoRequest())
    assert (info.vocab_size, info.bos_token_id, info.eos_token_id, info.pad_token_id) == (49152, 1, 2, 2)
    assert {t.content: t.id for t in info.special_tokens}["<|im_end|>"] == 2
    assert info.max_model_length == 8192  # from config.json: the tokenizer declares no limit
    assert info.has_chat_template
    assert info.fingerprint == tokenizer_fingerprint(reference) and len(info.fingerprint) == 64


# --- DecodeStream ---------------------------------------------------------------------------------


def decode_stream(stub, chunks, skip, prompt_ids=()) -> list[pb.DecodeStreamResponse]:
    requests = [pb.DecodeStreamRequest(ids=chunk) for chunk in chunks]
    requests[0].skip_special_tokens = skip
    requests[0].prompt_ids.extend(prompt_ids)
    return list(stub.DecodeStream(iter(requests), timeout=10))


@pytest.mark.parametrize("skip", [True, False])
def test_decode_stream_equals_decode_at_every_split(stub, reference, skip):
    for text in CORPUS:
        ids = reference(text)["input_ids"]
        expected = stub.Decode(pb.DecodeRequest(ids=ids, skip_special_tokens=skip)).text
        for cut in range(len(ids) + 1):
            responses = decode_stream(stub, [ids[:cut], ids[cut:]], skip)
            assert [r.final for r in responses] == [False, False, True]  # one reply per message, then final
            assert "".join(r.text for r in responses) == expected, (text, cut)


def test_decode_stream_token_by_token_with_prompt(stub, reference):
    chat = [{"role": "user", "content": "Say hi"}]
    prompt = reference.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    answer = reference(" Héllo 🤗! 世界<|im_end|>")["input_ids"]
    responses = decode_stream(stub, [[i] for i in answer], skip=True, prompt_ids=prompt)
    assert "".join(r.text for r in responses) == " Héllo 🤗! 世界"
    assert any(r.text == "" for r in responses[:-1])  # the emoji's first bytes were held back
    assert decode_stream(stub, [[]], skip=False) == [pb.DecodeStreamResponse(), pb.DecodeStreamResponse(final=True)]


def test_a_long_decode_stream_equals_one_decode(stub, reference):
    """Thousands of ids in pushes up to the bound (the service keeps only a window of them) and a long
    prompt, of which only the tail is context: the text is still the one-shot decode's."""
    ids = reference(" ".join(CORPUS) * 12)["input_ids"]
    prompt = reference("A long prompt. " * 2000)["input_ids"]
    sizes = [1, MAX_PUSH, 7, MAX_PUSH - 1, 3] * 100
    chunks, at = [], 0
    for size in sizes:
        chunks.append(ids[at : at + size])
        at += size
    assert len(ids) > 2000 and at >= len(ids) and len(prompt) > 6000
    responses = decode_stream(stub, chunks, skip=False, prompt_ids=prompt)
    assert "".join(r.text for r in responses) == stub.Decode(pb.DecodeRequest(ids=ids)).text


# --- errors, health, reflection, fingerprints --------------------------------------------------------


def _role(role: int) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content="x")


BAD_UNARY = [
    ("Encode", pb.EncodeRequest(text="x", max_length=-1), "max_length"),
    ("Encode", pb.EncodeRequest(text="x", max_length=0), "max_length"),
    ("Encode", pb.EncodeRequest(text="x", truncation_side=7), "truncation_side"),
    ("BatchEncode", pb.BatchEncodeRequest(texts=["x"], max_length=-5), "max_length"),
    ("BatchEncode", pb.BatchEncodeRequest(texts=["x"] * (MAX_BATCH + 1)), "texts"),
    ("Decode", pb.DecodeRequest(ids=[5, 49152]), "ids"),
    ("Decode", pb.DecodeRequest(ids=[2**32 - 1]), "ids"),
    ("ApplyChatTemplate", pb.ApplyChatTemplateRequest(), "messages"),
    (
        "ApplyChatTemplate",
        pb.ApplyChatTemplateRequest(messages=[_role(common_pb2.CHAT_ROLE_UNSPECIFIED)]),
        "messages[0].role",
    ),
    (
        "ApplyChatTemplate",
        pb.ApplyChatTemplateRequest(messages=[_role(common_pb2.CHAT_ROLE_USER), _role(42)]),
        "messages[1].role",
    ),
]
BAD_STREAMS = [
    ([pb.DecodeStreamRequest(ids=[1, 49153])], "ids"),
    ([pb.DecodeStreamRequest(prompt_ids=[10**6])], "prompt_ids"),
    ([pb.DecodeStreamRequest(ids=[1]), pb.DecodeStreamRequest(ids=[2], prompt_ids=[3])], "prompt_ids"),
    ([pb.DecodeStreamRequest(ids=[1]), pb.DecodeStreamRequest(ids=[28120] * (MAX_PUSH + 1))], "ids"),
]


@pytest.mark.parametrize("method, request_, field", BAD_UNARY, ids=[f"{m}-{f}" for m, _, f in BAD_UNARY])
def test_bad_request_is_invalid_argument(stub, method, request_, field):
    with pytest.raises(grpc.RpcError) as error:
        getattr(stub, method)(request_, timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:"), error.value.details()
    assert list(stub.Encode(pb.EncodeRequest(text="still fine")).ids)


@pytest.mark.parametrize("requests, field", BAD_STREAMS, ids=[f for _, f in BAD_STREAMS])
def test_bad_stream_is_invalid_argument(stub, requests, field):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.DecodeStream(iter(requests), timeout=5))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:"), error.value.details()
    assert stub.Decode(pb.DecodeRequest(ids=[28120])).text == "hello"


def test_health_follows_loading(config, reference, service):
    server = ServerThread(config, load=False)
    try:
        for name in ("", SERVICE_NAME):
            assert server.health(name) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Encode(pb.EncodeRequest(text="early"), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        server.run(server.server.load())  # from disk again: a second, independent start
        for name in ("", SERVICE_NAME):
            assert server.health(name) == health_pb2.HealthCheckResponse.SERVING
        assert list(server.stub.Encode(pb.EncodeRequest(text="hello")).ids) == [28120]
        # The same files give the same fingerprint in another server start.
        first = service.stub.GetInfo(pb.GetInfoRequest()).fingerprint
        assert server.stub.GetInfo(pb.GetInfoRequest()).fingerprint == first
    finally:
        server.close()


@pytest.mark.parametrize("variant", ["one_added_token", "tiny_bpe"])
def test_fingerprint_differs_for_another_tokenizer(config, reference, stub, variant):
    if variant == "one_added_token":
        other = copy.deepcopy(reference)
        other.add_tokens(["<tokenwire_extra>"])
    else:
        other = build_byte_fallback_tokenizer()
    server = ServerThread(config, tokenizer=other)
    try:
        info = server.stub.GetInfo(pb.GetInfoRequest())
        assert info.vocab_size == len(other)
        assert info.fingerprint != stub.GetInfo(pb.GetInfoRequest()).fingerprint
        if variant == "tiny_bpe":  # no chat template: a server-side precondition, not a bad request
            with pytest.raises(grpc.RpcError) as error:
                request = pb.ApplyChatTemplateRequest(messages=[_role(common_pb2.CHAT_ROLE_USER)])
                server.stub.ApplyChatTemplate(request)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.close()


def test_reflection_lists_the_service(service):
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [response] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_micro_benchmark_runs_against_a_real_service_process(smollm2_dir, capsys):
    """`python -m tokenwire.bench.tokenizer` on a few texts: the service (a subprocess) and in-process
    ids agree (it asserts that itself), and every figure is printed."""
    assert (
        tokenizer_bench.main(
            ["--model", smollm2_dir, "--texts", "16", "--batch", "8", "--repeats", "1", "--latency-calls", "5"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"service over gRPC +\d+", out) and re.search(r"service / in-process Rust: [\d.]+", out)


def test_a_model_without_chat_template_gets_its_own_error(config):
    """Not a tokenizer mismatch (the SDK once said so): its own reason on the wire and its own SDK error."""
    server = ServerThread(config, tokenizer=build_byte_fallback_tokenizer())  # a base model: no template
    try:
        with pytest.raises(grpc.RpcError) as error:
            server.stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=[_role(common_pb2.CHAT_ROLE_USER)]))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (REASON_METADATA_KEY, REASON_NO_CHAT_TEMPLATE) in tuple(error.value.trailing_metadata())
        with Client(tokenizer=f"127.0.0.1:{server.port}", engine="127.0.0.1:1", timeout=10) as client:
            with pytest.raises(NoChatTemplateError, match="this model has no chat template; send text or ids"):
                client.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        server.close()


# --- --chat-template, tools, template options --------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def test_chat_template_override_is_fingerprinted_and_renders_tools(config, reference, smollm2_dir):
    from dataclasses import replace

    from tokenwire.tokenizer.chat_templates import template_text
    from tokenwire.tokenizer.tokenizer import load_tokenizer

    server = ServerThread(replace(config, chat_template="chatml-tools"))
    try:
        info = server.stub.GetInfo(pb.GetInfoRequest())
        assert info.fingerprint != tokenizer_fingerprint(reference)
        assert info.fingerprint == tokenizer_fingerprint(load_tokenizer(smollm2_dir, chat_template="chatml-tools"))
        user = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hi")
        call = common_pb2.ToolCall(id="c1", name="f", arguments='{"x": 1}')
        assistant = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_ASSISTANT, tool_calls=[call])
        tool = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_TOOL, content="42", tool_call_id="c1")
        request = pb.ApplyChatTemplateRequest(
            messages=[user, assistant, tool], tools=['{"type": "function", "function": {"name": "f"}}'],
            add_generation_prompt=True, return_text=True,
        )  # fmt: skip
        text = server.stub.ApplyChatTemplate(request).text
        expected = reference.apply_chat_template(
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
                ]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ],
            tools=[{"type": "function", "function": {"name": "f"}}],
            chat_template=template_text("chatml-tools"), add_generation_prompt=True, tokenize=False,
        )  # fmt: skip
        assert text == expected and '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>' in text
        plain = pb.ApplyChatTemplateRequest(messages=[user], add_generation_prompt=True, return_text=True)
        ours = server.stub.ApplyChatTemplate(plain)
        assert ours.text == reference.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                          add_generation_prompt=True)  # fmt: skip
    finally:
        server.close()
    with pytest.raises(ValueError, match="not a shipped template"):
        load_tokenizer(smollm2_dir, chat_template="no-such-template")


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"tools": [json.dumps(TOOL)]}, "tools"),  # the model's own template never reads `tools`
        ({"tools": ["[1"]}, "tools[0]"),
        ({"chat_template_kwargs": '{"add_generation_prompt": true}'}, "chat_template_kwargs"),
        ({"chat_template_kwargs": "[]"}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),
    ],
)
def test_bad_template_options_name_their_field(stub, fields, field):
    user = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hi")
    with pytest.raises(grpc.RpcError) as error:
        stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=[user], **fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


def test_continue_final_message_leaves_the_turn_open(stub, reference):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello the"}]
    roles = {"user": common_pb2.CHAT_ROLE_USER, "assistant": common_pb2.CHAT_ROLE_ASSISTANT}
    messages = [common_pb2.ChatMessage(role=roles[m["role"]], content=m["content"]) for m in chat]
    response = stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(messages=messages, continue_final_message=True))
    expected = reference.apply_chat_template(chat, continue_final_message=True)["input_ids"]
    assert list(response.ids) == expected and reference.decode(expected).endswith("Hello the")


# Gemma's templates as those checkpoints ship them, reduced to their role handling: Gemma 2's refuses a
# system message, Gemma 3's folds it into the first user turn. Neither may lose it silently.
GEMMA_TEMPLATES = Path(__file__).parent / "data"


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_system_message_is_folded_or_refused_by_gemma_templates_never_dropped(config, family):
    from dataclasses import replace

    server = ServerThread(replace(config, chat_template=str(GEMMA_TEMPLATES / f"{family}_chat_template.jinja")))
    try:
        system = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_SYSTEM, content="Answer in French.")
        user = common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="hi")
        request = pb.ApplyChatTemplateRequest(messages=[system, user], add_generation_prompt=True, return_text=True)
        if family == "gemma2":
            with pytest.raises(grpc.RpcError) as error:
                server.stub.ApplyChatTemplate(request)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "messages" in error.value.details() and "System role not supported" in error.value.details()
        else:
            text = server.stub.ApplyChatTemplate(request).text
            assert text.endswith("<start_of_turn>user\nAnswer in French.\n\nhi<end_of_turn>\n<start_of_turn>model\n")
        without_system = pb.ApplyChatTemplateRequest(messages=[user], add_generation_prompt=True, return_text=True)
        assert server.stub.ApplyChatTemplate(without_system).text.endswith(
            "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        )
    finally:
        server.close()

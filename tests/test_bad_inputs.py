"""Bad input at the edge of both services: every refusal has the right status code and a message that
starts with the offending field (also sent as `tokenwire-field` trailing metadata), and the service
serves a good request correctly right after. Hand-serialized bytes reach the parts a typed client
cannot: invalid UTF-8 in `string` fields and corrupt protobuf. In-process servers on port 0."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from tokenwire.client import Client, InvalidRequestError
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.v1 import common_pb2, engine_pb2_grpc, tokenizer_pb2_grpc
from tokenwire.v1 import engine_pb2 as epb
from tokenwire.v1 import tokenizer_pb2 as tpb
from transformers import AutoTokenizer

from tests.reference import ENGINE_DTYPE
from tests.servers import EngineThread, TokenizerThread, rpc_error, wait_until_idle

VOCAB = 49152
CONTEXT = 1024  # the tiny Llama's max_position_embeddings
NEW_TOKENS_CAP = 64
MAX_MESSAGE = 1 << 20  # both servers refuse bigger messages (RESOURCE_EXHAUSTED)
MAX_BATCH_TEXTS = 8
FIELD_KEY = "tokenwire-field"
GOOD_PROMPT = "The capital of France is"
ENGINE = "/tokenwire.v1.EngineService/"
TOKENIZER = "/tokenwire.v1.TokenizerService/"
INVALID, TOO_BIG = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Bad:
    """One bad input: the method, the request (a message, raw bytes, or a list of either for a client
    stream), the status it must get, and the field its message must start with (None: gRPC's own)."""

    name: str
    method: str
    request: object
    field: str | None
    code: grpc.StatusCode = INVALID


def ids(token_ids, **sampling) -> epb.GenerateRequest:
    return epb.GenerateRequest(token_ids=epb.TokenIds(ids=token_ids), sampling=epb.SamplingParams(**sampling))


def with_request_id(request: epb.GenerateRequest, request_id: str) -> epb.GenerateRequest:
    request.request_id = request_id
    return request


def bad_utf8(message, placeholder: str) -> bytes:
    """`message` serialized with `placeholder` (4 chars) swapped for 4 bytes that are not UTF-8; the
    length prefixes stay right, so the bytes are valid protobuf with an invalid string."""
    raw = message.SerializeToString()
    assert raw.count(placeholder.encode()) == 1
    return raw.replace(placeholder.encode(), b"\xff\xfe\xc3\x28")


OK_ID = [1, 2, 3]
ENGINE_CASES = [
    # the prompt
    Bad("empty text", "Generate", epb.GenerateRequest(text=""), "text"),
    Bad("no prompt", "Generate", epb.GenerateRequest(), "prompt"),
    Bad("empty ids", "Generate", ids([]), "token_ids.ids"),
    Bad("id = vocab size", "Generate", ids([1, VOCAB]), "token_ids.ids"),
    Bad("id = 2^32-1", "Generate", ids([2**32 - 1]), "token_ids.ids"),
    Bad("ids fill the context", "Generate", ids([5] * CONTEXT), "token_ids.ids"),
    Bad("text longer than the context", "Generate", epb.GenerateRequest(text="hello " * (CONTEXT + 10)), "text"),
    Bad("text that encodes to no tokens", "Generate", epb.GenerateRequest(text="\x06"), "text"),  # found by test_fuzz
    Bad("text with bad UTF-8", "Generate", bad_utf8(epb.GenerateRequest(text="Hi WXYZ"), "WXYZ"), "text"),
    # sampling
    Bad("max_new_tokens 0", "Generate", ids(OK_ID, max_new_tokens=0), "sampling.max_new_tokens"),
    Bad("prompt_logprobs past max_logprobs", "Generate", ids(OK_ID, prompt_logprobs=21), "sampling.prompt_logprobs"),
    Bad("prompt_logprobs < 0", "Generate", ids(OK_ID, prompt_logprobs=-1), "sampling.prompt_logprobs"),
    Bad("min_tokens > max_new_tokens", "Generate", ids(OK_ID, max_new_tokens=2, min_tokens=3), "sampling.min_tokens"),
    Bad("min_tokens < 0", "Generate", ids(OK_ID, min_tokens=-1), "sampling.min_tokens"),
    Bad("max_new_tokens -1", "Generate", ids(OK_ID, max_new_tokens=-1), "sampling.max_new_tokens"),
    Bad(
        "max_new_tokens above cap", "Generate", ids(OK_ID, max_new_tokens=NEW_TOKENS_CAP + 1), "sampling.max_new_tokens"
    ),
    Bad("temperature NaN", "Generate", ids(OK_ID, temperature=float("nan")), "sampling.temperature"),
    Bad("temperature inf", "Generate", ids(OK_ID, temperature=float("inf")), "sampling.temperature"),
    Bad("temperature negative", "Generate", ids(OK_ID, temperature=-0.5), "sampling.temperature"),
    Bad("top_p 0", "Generate", ids(OK_ID, top_p=0.0), "sampling.top_p"),
    Bad("top_p 1.5", "Generate", ids(OK_ID, top_p=1.5), "sampling.top_p"),
    Bad("top_p NaN", "Generate", ids(OK_ID, top_p=float("nan")), "sampling.top_p"),
    Bad("top_k negative", "Generate", ids(OK_ID, top_k=-1), "sampling.top_k"),
    Bad("min_p above 1", "Generate", ids(OK_ID, min_p=1.5), "sampling.min_p"),
    Bad("repetition_penalty 0", "Generate", ids(OK_ID, repetition_penalty=0.0), "sampling.repetition_penalty"),
    Bad("presence_penalty 3", "Generate", ids(OK_ID, presence_penalty=3.0), "sampling.presence_penalty"),
    Bad(
        "frequency_penalty -inf", "Generate", ids(OK_ID, frequency_penalty=float("-inf")), "sampling.frequency_penalty"
    ),
    Bad("seed negative", "Generate", ids(OK_ID, seed=-1), "sampling.seed"),
    Bad("17 stop strings", "Generate", ids(OK_ID, stop=[f"s{i}" for i in range(17)]), "sampling.stop"),
    Bad("257-char stop string", "Generate", ids(OK_ID, stop=["x" * 257]), "sampling.stop"),
    Bad("empty stop string", "Generate", ids(OK_ID, stop=[""]), "sampling.stop"),
    Bad(
        "stop string with bad UTF-8", "Generate", bad_utf8(ids(OK_ID, stop=["ok", "WXYZ"]), "WXYZ"), "sampling.stop[1]"
    ),
    Bad("stop_token_ids out of vocab", "Generate", ids(OK_ID, stop_token_ids=[VOCAB]), "sampling.stop_token_ids"),
    Bad("257 stop_token_ids", "Generate", ids(OK_ID, stop_token_ids=list(range(257))), "sampling.stop_token_ids"),
    Bad("logprobs above cap", "Generate", ids(OK_ID, logprobs=21), "sampling.logprobs"),
    Bad("logprobs negative", "Generate", ids(OK_ID, logprobs=-1), "sampling.logprobs"),
    # structured output (the constraint oneof)
    Bad("json_schema not JSON", "Generate", ids(OK_ID, json_schema="{oops"), "sampling.json_schema"),
    Bad("json_schema not a schema", "Generate", ids(OK_ID, json_schema='{"type": 3}'), "sampling.json_schema"),
    Bad(
        "json_schema over 64 KiB",
        "Generate",
        ids(OK_ID, json_schema='{"title": "%s"}' % ("x" * 65536)),
        "sampling.json_schema",
    ),
    Bad("regex that does not compile", "Generate", ids(OK_ID, regex="[a-"), "sampling.regex"),
    Bad("empty choice list", "Generate", ids(OK_ID, choice=epb.Choice()), "sampling.choice"),
    Bad(
        "1,025 choices",
        "Generate",
        ids(OK_ID, choice=epb.Choice(values=[str(i) for i in range(1025)])),
        "sampling.choice",
    ),
    Bad("grammar syntax error", "Generate", ids(OK_ID, grammar='root ::= "a" | ('), "sampling.grammar"),
    # identity and framing
    Bad("request_id with a newline", "Generate", with_request_id(ids(OK_ID), "a\nforged log line"), "request_id"),
    Bad("request_id of 300 chars", "Generate", with_request_id(ids(OK_ID), "r" * 300), "request_id"),
    Bad(
        "malformed fingerprint",
        "Generate",
        epb.GenerateRequest(token_ids=epb.TokenIds(ids=OK_ID), tokenizer_fingerprint="abc"),
        "tokenizer_fingerprint",
    ),
    Bad(
        "another tokenizer's fingerprint",
        "Generate",
        epb.GenerateRequest(token_ids=epb.TokenIds(ids=OK_ID), tokenizer_fingerprint="0" * 64),
        "tokenizer_fingerprint",
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    Bad("not protobuf", "Generate", b"\xff\xff\xff\xff", "request"),
    Bad("message over the size limit", "Generate", epb.GenerateRequest(text="x" * (MAX_MESSAGE + 1)), None, TOO_BIG),
    # GenerateBatch
    Bad("empty batch", "GenerateBatch", epb.GenerateBatchRequest(), "requests"),
    Bad(
        "bad request inside a batch",
        "GenerateBatch",
        epb.GenerateBatchRequest(requests=[ids(OK_ID), ids(OK_ID, top_p=2.0)]),
        "requests[1].sampling.top_p",
    ),
    Bad(
        "duplicate ids inside a batch",
        "GenerateBatch",
        epb.GenerateBatchRequest(requests=[with_request_id(ids(OK_ID), "dup"), with_request_id(ids(OK_ID), "dup")]),
        "requests[1].request_id",
        grpc.StatusCode.ALREADY_EXISTS,
    ),
    Bad(
        "batch over the admission bound",
        "GenerateBatch",
        epb.GenerateBatchRequest(requests=[ids(OK_ID)] * 65),
        "requests",
    ),
    Bad(
        "bad UTF-8 text inside a batch",
        "GenerateBatch",
        bad_utf8(epb.GenerateBatchRequest(requests=[ids(OK_ID), epb.GenerateRequest(text="WXYZ")]), "WXYZ"),
        "requests[1].text",
    ),
]


def chat(*messages) -> tpb.ApplyChatTemplateRequest:
    return tpb.ApplyChatTemplateRequest(
        messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in messages]
    )


USER, ASSISTANT = common_pb2.CHAT_ROLE_USER, common_pb2.CHAT_ROLE_ASSISTANT
TOKENIZER_CASES = [
    Bad("Encode max_length 0", "Encode", tpb.EncodeRequest(text="hi", max_length=0), "max_length"),
    Bad("Encode max_length negative", "Encode", tpb.EncodeRequest(text="hi", max_length=-5), "max_length"),
    Bad("Encode unknown truncation side", "Encode", tpb.EncodeRequest(text="hi", truncation_side=7), "truncation_side"),
    Bad("Encode bad UTF-8", "Encode", bad_utf8(tpb.EncodeRequest(text="WXYZ"), "WXYZ"), "text"),
    Bad("Encode over the size limit", "Encode", tpb.EncodeRequest(text="x" * (MAX_MESSAGE + 1)), None, TOO_BIG),
    Bad(
        "BatchEncode too many texts",
        "BatchEncode",
        tpb.BatchEncodeRequest(texts=["a"] * (MAX_BATCH_TEXTS + 1)),
        "texts",
    ),
    Bad(
        "BatchEncode bad UTF-8",
        "BatchEncode",
        bad_utf8(tpb.BatchEncodeRequest(texts=["a", "b", "WXYZ"]), "WXYZ"),
        "texts[2]",
    ),
    Bad("BatchEncode max_length 0", "BatchEncode", tpb.BatchEncodeRequest(texts=["a"], max_length=0), "max_length"),
    Bad("Decode id out of vocab", "Decode", tpb.DecodeRequest(ids=[1, VOCAB]), "ids"),
    Bad("Decode not protobuf", "Decode", b"\x0a\xff\xff\xff\x0f", "request"),
    Bad(
        "DecodeStream id out of vocab",
        "DecodeStream",
        [tpb.DecodeStreamRequest(ids=[1]), tpb.DecodeStreamRequest(ids=[VOCAB + 5])],
        "ids",
    ),
    Bad(
        "DecodeStream prompt_ids after the first message",
        "DecodeStream",
        [tpb.DecodeStreamRequest(ids=[1]), tpb.DecodeStreamRequest(ids=[2], prompt_ids=[3])],
        "prompt_ids",
    ),
    Bad(
        "DecodeStream prompt_ids out of vocab",
        "DecodeStream",
        [tpb.DecodeStreamRequest(prompt_ids=[VOCAB])],
        "prompt_ids",
    ),
    Bad("DecodeStream corrupt message", "DecodeStream", [tpb.DecodeStreamRequest(ids=[1]), b"\xff\xff"], "request"),
    Bad("chat without messages", "ApplyChatTemplate", chat(), "messages"),
    Bad("chat role unset", "ApplyChatTemplate", chat((common_pb2.CHAT_ROLE_UNSPECIFIED, "hi")), "messages[0].role"),
    Bad("chat role unknown", "ApplyChatTemplate", chat((USER, "hi"), (99, "beep")), "messages[1].role"),
    Bad(
        "chat content bad UTF-8",
        "ApplyChatTemplate",
        bad_utf8(chat((USER, "hi"), (ASSISTANT, "WXYZ")), "WXYZ"),
        "messages[1].content",
    ),
]


# ---- servers ----


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    config = EngineConfig(
        model=tiny_llama_dir, dtype=ENGINE_DTYPE, max_new_tokens_cap=NEW_TOKENS_CAP, cache=CacheConfig(num_blocks=256)
    )
    server = EngineThread(config, ServerConfig(port=0, max_message_bytes=MAX_MESSAGE, max_pending_requests=64))
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    server = TokenizerThread(
        TokenizerServiceConfig(model=smollm2_dir, port=0, max_message_bytes=MAX_MESSAGE, max_batch_size=MAX_BATCH_TEXTS)
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine_channel(engine):
    with grpc.insecure_channel(engine.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def tokenizer_channel(tokenizer):
    with grpc.insecure_channel(tokenizer.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def good_generation(engine_channel, reference):
    """A good request and its greedy output, taken before any bad input was sent."""
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    request = ids(reference.encode(GOOD_PROMPT), max_new_tokens=6, temperature=0.0)
    return request, _generated(stub.Generate(request, timeout=30))


# ---- the cases ----


def test_at_least_40_distinct_bad_inputs():
    names = [case.name for case in ENGINE_CASES + TOKENIZER_CASES]
    assert len(set(names)) == len(names) >= 40


@pytest.mark.parametrize("case", ENGINE_CASES, ids=lambda case: case.name)
def test_engine_refuses_then_serves(engine_channel, good_generation, case):
    _check_refusal(_call(engine_channel, ENGINE + case.method, case.request), case)
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    request, expected = good_generation
    assert _generated(stub.Generate(request, timeout=30)) == expected
    stats = wait_until_idle(stub)
    assert stats.num_free_kv_blocks == stats.num_kv_blocks and stats.num_active_requests == 0


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=lambda case: case.name)
def test_tokenizer_refuses_then_serves(tokenizer_channel, reference, case):
    _check_refusal(_call(tokenizer_channel, TOKENIZER + case.method, case.request), case)
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(tokenizer_channel)
    assert list(stub.Encode(tpb.EncodeRequest(text=GOOD_PROMPT), timeout=10).ids) == reference.encode(GOOD_PROMPT)


def test_sdk_reports_an_oversized_request_as_invalid_not_overloaded(engine):
    """gRPC answers RESOURCE_EXHAUSTED for a message over the limit; retrying cannot help, so the SDK
    raises InvalidRequestError rather than OverloadedError."""
    with Client(tokenizer=None, engine=engine.address, timeout=30) as client:
        with pytest.raises(InvalidRequestError) as err:
            client.complete("x" * (MAX_MESSAGE + 1))
        assert err.value.code == TOO_BIG and err.value.field == "request"
        assert client.complete(token_ids=OK_ID, max_new_tokens=2).usage.completion_tokens == 2


def test_sdk_sends_constraints_and_parses_json(engine):
    """A schema given as a dict reaches the engine as JSON text; even random weights then emit valid JSON.
    Two constraints at once are refused by the SDK, before sending (the oneof would keep only one)."""
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    with Client(tokenizer=None, engine=engine.address, timeout=30) as client:
        assert client.complete("Hi", json_schema=schema, max_new_tokens=16).json() in ({"a": "x"}, {"a": "y"})
        assert client.complete("Hi", choice=["left", "right"], max_new_tokens=8).text in ("left", "right")
        with pytest.raises(InvalidRequestError) as err:
            client.complete("Hi", regex="a+", choice=["a"])
        assert err.value.field == "sampling.choice"


def test_both_text_and_ids_cannot_reach_the_engine(engine_channel, good_generation):
    """`prompt` is a proto oneof: a message carrying both fields parses as the last one (protobuf's rule
    for every language), so "both" cannot arrive as such; the SDK refuses it before sending."""
    both = ids(OK_ID).SerializeToString() + epb.GenerateRequest(text="Hi").SerializeToString()
    assert epb.GenerateRequest.FromString(both).WhichOneof("prompt") == "text"
    with Client(tokenizer=None, engine="127.0.0.1:1") as client, pytest.raises(TypeError):
        client.complete("Hi", token_ids=OK_ID)


# ---- helpers ----


def _call(channel: grpc.Channel, method: str, request) -> grpc.RpcError:
    """Send `request` as raw bytes through a generic stub, so hand-made bytes go out unchanged."""
    raw = lambda r: r if isinstance(r, bytes) else r.SerializeToString()  # noqa: E731
    if method.endswith("/Generate"):
        return rpc_error(channel.unary_stream(method), raw(request), timeout=30)
    if method.endswith("/DecodeStream"):
        return rpc_error(channel.stream_stream(method), iter([raw(r) for r in request]), timeout=30)
    return rpc_error(channel.unary_unary(method), raw(request), timeout=30)


def _check_refusal(error: grpc.RpcError, case: Bad) -> None:
    assert error.code() == case.code, error.details()
    if case.field is None:  # gRPC's own size check
        assert "larger than max" in error.details()
        return
    assert error.details().startswith(f"{case.field}: "), error.details()
    assert (FIELD_KEY, case.field) in tuple(error.trailing_metadata() or ())


def _generated(responses) -> tuple[list[int], int]:
    responses = list(responses)
    return [t for r in responses for t in r.token_ids], responses[-1].finish_reason

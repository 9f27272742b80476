"""Property-based fuzzing of both services with hypothesis: random request messages (any field set or
not, values in and far outside their valid ranges, NaN and infinities, odd Unicode) and random raw bytes.
Whatever arrives, a service answers OK or a precise refusal naming the field, never INTERNAL or
UNKNOWN, and the engine ends with every KV block free and no request left behind."""

from __future__ import annotations

import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.v1 import common_pb2, engine_pb2_grpc
from tokenwire.v1 import engine_pb2 as epb
from tokenwire.v1 import tokenizer_pb2 as tpb

from tests.reference import ENGINE_DTYPE
from tests.servers import EngineThread, TokenizerThread, wait_until_idle

NEW_TOKENS_CAP = 16  # the engine default for an unset max_new_tokens; keeps generations short
FINGERPRINT = "fingerprint"  # stands for the engine's own fingerprint; swapped in before sending
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS}
# The suite runs a fixed sample (reproducible: the same examples every run, ~15 s);
# TOKENWIRE_FUZZ_EXAMPLES=2000 runs a deeper random search (about 3 minutes at 1500).
DEEP = int(os.environ.get("TOKENWIRE_FUZZ_EXAMPLES", "0"))
EXAMPLES = DEEP or 100
SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=not DEEP,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
small = st.integers(-3, 12)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-3, 3)
vocab_ids = st.integers(0, 49151)
token_ids = st.lists(vocab_ids | uint32, max_size=40)
texts = st.text(max_size=80)
printable_ids = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=24)


def optional(strategy):
    return st.none() | strategy


# Each field: (a valid value, anything at all). A request is all valid, valid but for one wild field, or
# wild throughout, so the generation path is exercised as well as every refusal.
SAMPLING_FIELDS = {
    "max_new_tokens": (st.integers(1, NEW_TOKENS_CAP), small | int32),
    "temperature": (st.floats(0, 2), floats),
    "top_k": (st.integers(0, 100), small | int32),
    "top_p": (st.floats(0.01, 1), floats),
    "min_p": (st.floats(0, 1), floats),
    "repetition_penalty": (st.floats(0.5, 2), floats),
    "presence_penalty": (st.floats(-2, 2), floats),
    "frequency_penalty": (st.floats(-2, 2), floats),
    "seed": (st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "logprobs": (st.integers(0, 20), small | int32),
    "skip_special_tokens": (st.booleans(), st.booleans()),
    "stop": (
        st.lists(st.text(min_size=1, max_size=8), max_size=4),
        st.lists(st.text(max_size=8) | st.text(min_size=250, max_size=300), max_size=18),
    ),
    "stop_token_ids": (st.lists(vocab_ids, max_size=4), st.lists(vocab_ids | uint32, max_size=300)),
}
REQUEST_FIELDS = {
    "request_id": (st.just("") | printable_ids, st.text(max_size=12)),
    "tokenizer_fingerprint": (st.sampled_from(["", FINGERPRINT]), st.sampled_from(["0" * 64]) | texts),
    "prompt": (
        st.tuples(st.just("text"), st.text(min_size=1, max_size=80))
        | st.tuples(st.just("ids"), st.lists(vocab_ids, min_size=1, max_size=40)),
        st.tuples(st.sampled_from(["none", "text", "ids"]), texts | token_ids),
    ),
}


@st.composite
def generate_requests(draw) -> epb.GenerateRequest:
    mode = draw(st.sampled_from(["valid", "valid", "one wild", "wild"]))
    wild_one = draw(st.sampled_from(sorted(SAMPLING_FIELDS) + sorted(REQUEST_FIELDS)))

    def value(name: str, fields: dict):
        valid, wild = fields[name]
        use_wild = mode == "wild" or (mode == "one wild" and name == wild_one)
        return draw(wild if use_wild else valid)

    msg = epb.GenerateRequest(
        request_id=value("request_id", REQUEST_FIELDS),
        tokenizer_fingerprint=value("tokenizer_fingerprint", REQUEST_FIELDS),
        return_text=draw(st.booleans()),
    )
    kind, prompt = value("prompt", REQUEST_FIELDS)
    if kind == "text":
        msg.text = prompt if isinstance(prompt, str) else ""
    elif kind == "ids":
        msg.token_ids.ids.extend(prompt if isinstance(prompt, list) else [])
    for name in SAMPLING_FIELDS:
        if draw(st.booleans()) or (mode == "one wild" and name == wild_one):
            field = value(name, SAMPLING_FIELDS)
            if isinstance(field, list):
                getattr(msg.sampling, name).extend(field)
            else:
                setattr(msg.sampling, name, field)
    return msg


roles = st.integers(0, 6)
tokenizer_requests = st.one_of(
    st.builds(
        lambda text, special, length, side: (
            "Encode",
            tpb.EncodeRequest(text=text, truncation_side=side, **_set(add_special_tokens=special, max_length=length)),
        ),
        texts,
        optional(st.booleans()),
        optional(small | int32),
        st.integers(0, 5),
    ),
    st.builds(
        lambda items, length: ("BatchEncode", tpb.BatchEncodeRequest(texts=items, **_set(max_length=length))),
        st.lists(texts, max_size=10),
        optional(small | int32),
    ),
    st.builds(
        lambda ids, skip: ("Decode", tpb.DecodeRequest(ids=ids, skip_special_tokens=skip)), token_ids, st.booleans()
    ),
    st.builds(
        lambda messages, gen: (
            "ApplyChatTemplate",
            tpb.ApplyChatTemplateRequest(
                messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages],
                add_generation_prompt=gen,
                return_text=True,
            ),
        ),
        st.lists(st.tuples(roles, texts), max_size=5),
        st.booleans(),
    ),
    st.builds(
        lambda chunks: (
            "DecodeStream",
            [tpb.DecodeStreamRequest(ids=ids, prompt_ids=prompt) for ids, prompt in chunks],
        ),
        st.lists(st.tuples(token_ids, st.lists(st.integers(0, 49151) | uint32, max_size=3)), max_size=4),
    ),
)
raw_calls = st.tuples(
    st.sampled_from(
        [
            "/tokenwire.v1.EngineService/Generate",
            "/tokenwire.v1.EngineService/GenerateBatch",
            "/tokenwire.v1.TokenizerService/Encode",
            "/tokenwire.v1.TokenizerService/ApplyChatTemplate",
            "/tokenwire.v1.TokenizerService/Decode",
        ]
    ),
    st.binary(max_size=64),
)


def _set(**fields) -> dict:
    return {k: v for k, v in fields.items() if v is not None}


# ---- servers ----


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    config = EngineConfig(
        model=tiny_llama_dir, dtype=ENGINE_DTYPE, max_new_tokens_cap=NEW_TOKENS_CAP, cache=CacheConfig(num_blocks=64)
    )
    server = EngineThread(config, ServerConfig(port=0))
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    server = TokenizerThread(TokenizerServiceConfig(model=smollm2_dir, port=0, max_batch_size=8))
    yield server
    server.close()


@pytest.fixture(scope="module")
def engine_channel(engine):
    with grpc.insecure_channel(engine.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def fingerprint(engine_channel) -> str:
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)
    return stub.GetModelInfo(epb.GetModelInfoRequest()).tokenizer_fingerprint


# ---- properties ----


def test_engine_survives_random_generate_requests(engine_channel, fingerprint):
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)

    @SETTINGS
    @given(generate_requests())
    def generate(request):
        if request.tokenizer_fingerprint == FINGERPRINT:
            request.tokenizer_fingerprint = fingerprint
        outcome = _outcome(lambda: list(stub.Generate(request, timeout=30)))
        if not isinstance(outcome, grpc.RpcError):
            assert outcome[-1].finish_reason != epb.FINISH_REASON_UNSPECIFIED
            assert sum(len(r.token_ids) for r in outcome) <= NEW_TOKENS_CAP

    generate()
    _assert_nothing_leaked(stub)


def test_engine_survives_random_batches(engine_channel, fingerprint):
    stub = engine_pb2_grpc.EngineServiceStub(engine_channel)

    @settings(SETTINGS, max_examples=EXAMPLES * 2 // 5)
    @given(st.lists(generate_requests(), max_size=4))
    def batch(requests):
        for request in requests:
            if request.tokenizer_fingerprint == FINGERPRINT:
                request.tokenizer_fingerprint = fingerprint
        outcome = _outcome(lambda: stub.GenerateBatch(epb.GenerateBatchRequest(requests=requests), timeout=30))
        if not isinstance(outcome, grpc.RpcError):
            assert len(outcome.results) == len(requests)

    batch()
    _assert_nothing_leaked(stub)


def test_tokenizer_survives_random_requests(tokenizer):
    with grpc.insecure_channel(tokenizer.address) as channel:

        @SETTINGS
        @given(tokenizer_requests)
        def call(method_and_request):
            method, request = method_and_request
            path = f"/tokenwire.v1.TokenizerService/{method}"
            if method == "DecodeStream":
                stream = channel.stream_stream(path)
                _outcome(lambda: list(stream(iter([r.SerializeToString() for r in request]), timeout=30)))
            else:
                _outcome(lambda: channel.unary_unary(path)(request.SerializeToString(), timeout=30))

        call()


def test_both_services_survive_random_bytes(engine, tokenizer, engine_channel):
    with grpc.insecure_channel(tokenizer.address) as tokenizer_channel:

        @settings(SETTINGS, max_examples=EXAMPLES * 4 // 5)
        @given(raw_calls)
        def call(method_and_bytes):
            method, raw = method_and_bytes
            channel = engine_channel if "EngineService" in method else tokenizer_channel
            if method.endswith("/Generate"):
                _outcome(lambda: list(channel.unary_stream(method)(raw, timeout=30)))
            else:
                _outcome(lambda: channel.unary_unary(method)(raw, timeout=30))

        call()
    _assert_nothing_leaked(engine_pb2_grpc.EngineServiceStub(engine_channel))


# ---- helpers ----


def _outcome(call):
    """The call's result, or its RpcError if that is a precise refusal; anything else fails the test."""
    try:
        return call()
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"
        field = dict(error.trailing_metadata() or ()).get("tokenwire-field")
        assert field and error.details().startswith(field), error.details()
        return error


def _assert_nothing_leaked(stub) -> None:
    stats = wait_until_idle(stub)
    assert (stats.num_running, stats.num_waiting, stats.num_active_requests) == (0, 0, 0)
    assert stats.num_free_kv_blocks == stats.num_kv_blocks

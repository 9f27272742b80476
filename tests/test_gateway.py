"""The OpenAI-compatible gateway, driven by the official `openai` client (and raw HTTP where the client
hides the wire), over the real tokenizer and engine services on loopback (tiny Llama, port 0)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from tokenwire.client import Client
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.gateway.config import GatewayConfig
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.v1 import engine_pb2 as pb

from tests.gateway_servers import GatewayThread
from tests.reference import ENGINE_DTYPE
from tests.servers import EngineThread, TokenizerThread, wait_until_idle

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def services(tiny_llama_dir):
    tokenizer = TokenizerThread(TokenizerServiceConfig(model=tiny_llama_dir, port=0))
    engine = EngineThread(
        EngineConfig(model=tiny_llama_dir, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=256)), ServerConfig(port=0)
    )
    yield tokenizer, engine
    engine.close()
    tokenizer.close()


@pytest.fixture(scope="module")
def gateway(services):
    tokenizer, engine = services
    thread = GatewayThread(GatewayConfig(port=0, tokenizer=tokenizer.address, engine=engine.address, max_n=4))
    yield thread
    thread.close()


@pytest.fixture(autouse=True)
def encodes_once(request, engine_stub):
    """After every test: the engine tokenized nothing itself (every gateway request reached it as ids)."""
    yield
    assert engine_stub.GetModelInfo(pb.GetModelInfoRequest()).stats.num_prompt_encodes == 0


def test_completion_takes_every_prompt_form(oai, model):
    by_text = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    ids = httpx.post(str(oai.base_url).replace("/v1/", "/tokenize"), json={"prompt": "The capital of France is"}).json()
    by_ids = oai.completions.create(model=model, prompt=ids["tokens"], max_tokens=6, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].finish_reason == "length"
    assert by_text.usage.prompt_tokens == ids["count"] and by_text.usage.completion_tokens == 6
    many = oai.completions.create(
        model=model, prompt=["The capital of France is", "Hello"], max_tokens=6, temperature=0
    )
    lists = oai.completions.create(model=model, prompt=[ids["tokens"], [19556]], max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == lists.choices[0].text == by_text.choices[0].text
    assert many.choices[1].text == lists.choices[1].text


def test_chat_streams_what_it_answers_whole(oai, model):
    whole = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
    stream = list(
        oai.chat.completions.create(
            model=model, messages=CHAT, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    assert stream[-1].choices == [] and stream[-1].usage.completion_tokens == 8
    assert stream[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in stream[:-1])


def test_completion_stream_without_usage(oai, model):
    chunks = list(oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, stream=True))
    whole = oai.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert all(c.usage is None for c in chunks)


def test_raw_sse_framing(gateway, model):
    body = {"model": model, "prompt": "Hello", "max_tokens": 3, "stream": True}
    lines = httpx.post(gateway.url + "/v1/completions", json=body).text.split("\n\n")
    assert lines[-2:] == ["data: [DONE]", ""]
    assert all(line.startswith("data: {") for line in lines[:-2])


def test_n_samples_carry_their_index_and_count_the_prompt_once(oai, model):
    one = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=6, seed=3)
    two = oai.chat.completions.create(model=model, messages=CHAT, max_tokens=6, seed=3, n=2)
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.choices[0].message.content == one.choices[0].message.content  # sample 0 uses the seed itself
    assert two.usage.prompt_tokens == one.usage.prompt_tokens and two.usage.completion_tokens == 12
    chunks = list(oai.chat.completions.create(model=model, messages=CHAT, max_tokens=6, seed=3, n=2, stream=True))
    by_index = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert [by_index[i] for i in (0, 1)] == [c.message.content for c in sorted(two.choices, key=lambda c: c.index)]


def test_stop_string_ends_the_text_before_it(oai, model):
    free = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0).choices[0].text
    stop = free[4:7]
    stopped = oai.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra["stop_reason"] == stop  # vLLM's field: which stop string


def test_logit_bias_and_the_stop_reason_of_a_stop_token(oai, model, gateway):
    forced = oai.completions.create(
        model=model,
        prompt="Hello",
        max_tokens=3,
        temperature=0,
        logit_bias={"42": 100},
        logprobs=0,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    assert forced.choices[0].logprobs.tokens == ["token_id:42"] * 3
    assert forced.choices[0].finish_reason == "length" and forced.choices[0].model_extra["stop_reason"] is None
    body = {
        "model": model,
        "prompt": "Hello",
        "max_tokens": 8,
        "temperature": 0,
        "logit_bias": {"42": 100},
        "stop_token_ids": [42],
        "stream": True,
    }
    events = [
        json.loads(line[len("data: ") :])
        for line in httpx.post(gateway.url + "/v1/completions", json=body).text.split("\n\n")
        if line.startswith("data: {")
    ]
    final = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert [(c["finish_reason"], c["stop_reason"]) for c in final] == [("stop", 42)]
    assert all("stop_reason" not in c for e in events for c in e["choices"] if not c["finish_reason"])


def test_structured_output_through_response_format_and_guided_params(oai, model):
    """The tiny model's text is random; the constraint alone makes it valid (README "Structured output")."""
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    chat = oai.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=24,
        temperature=1.0,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "digit", "schema": schema}},
    )
    value = json.loads(chat.choices[0].message.content)
    assert set(value) == {"n"} and 0 <= value["n"] <= 9
    choice = oai.completions.create(
        model=model,
        prompt="Pick:",
        max_tokens=8,
        temperature=1.0,
        seed=1,
        extra_body={"guided_choice": ["red", "green", "blue"]},
    )
    assert choice.choices[0].text in {"red", "green", "blue"}
    regex = oai.completions.create(
        model=model,
        prompt="Date:",
        max_tokens=16,
        temperature=1.0,
        seed=2,
        extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])"},
    )
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", regex.choices[0].text)


def test_seed_reproduces_a_sample(oai, model):
    def sample(seed):
        return (
            oai.completions.create(model=model, prompt="Hello", max_tokens=10, temperature=1.0, seed=seed)
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_logprobs_in_both_shapes(oai, model):
    chat = oai.chat.completions.create(
        model=model, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(t.logprob == t.top_logprobs[0].logprob for t in content)  # greedy picks the top token
    text = oai.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    block = text.choices[0].logprobs
    assert len(block.tokens) == 4 and all(len(top) == 3 for top in block.top_logprobs)
    assert block.text_offset[0] == 0 and "".join(block.tokens) == text.choices[0].text


def test_echo_puts_the_prompt_first(oai, model):
    plain = oai.completions.create(model=model, prompt="Hello there", max_tokens=4, temperature=0)
    echoed = oai.completions.create(model=model, prompt="Hello there", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello there" + plain.choices[0].text


def test_greedy_chat_through_the_gateway_has_the_sdks_ids(oai, model, services):
    tokenizer, engine = services
    via_gateway = oai.chat.completions.create(
        model=model,
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    ids = [int(t.token.removeprefix("token_id:")) for t in via_gateway.choices[0].logprobs.content]
    with Client(tokenizer.address, engine.address) as sdk:
        direct = sdk.complete(messages=CHAT, max_new_tokens=10, temperature=0)
    assert tuple(ids) == direct.token_ids
    assert via_gateway.choices[0].message.content == direct.text


@pytest.mark.parametrize(
    "params, param",
    [
        ({"temperature": 7}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 10**6}, "max_tokens"),  # refused by the engine, named as OpenAI names it
        ({"n": 5}, "n"),  # above the gateway's --max-n
        ({"stop_token_ids": [10**7]}, "stop_token_ids"),
        ({"logprobs": 99}, "logprobs"),
        ({"stream": "yes"}, "stream"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),  # refused by the engine: sampling.logit_bias
        ({"logit_bias": {"five": 1}}, "logit_bias"),  # not a token id
        ({"guided_regex": "(unclosed"}, "guided_regex"),  # refused by the engine: sampling.regex
        ({"guided_choice": []}, "guided_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
            "response_format",
        ),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),  # two constraints
    ],
)
def test_a_bad_value_is_a_400_naming_its_param(oai, model, params, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model, prompt="Hello", extra_body=params)
    assert err.value.status_code == 400 and err.value.body["param"] == param
    assert err.value.body["message"].startswith(param)


def test_unknown_params_are_ignored_and_unknown_models_are_404(oai, model):
    ok = oai.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body={"no_such_option": 1})
    assert ok.usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="gpt-nope", prompt="Hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"


def test_malformed_json_says_where(gateway):
    response = httpx.post(gateway.url + "/v1/chat/completions", content=b'{"messages": [\n  {"role": "user",}]}')
    assert response.status_code == 400
    error = response.json()["error"]
    assert "line 2 column 19" in error["message"] and error["code"] == "json_invalid"


def test_client_disconnect_cancels_the_engine_request(gateway, model, engine_stub):
    body = {"model": model, "prompt": "Hello", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", gateway.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: {")
            assert engine_stub.GetModelInfo(pb.GetModelInfoRequest()).stats.num_running == 1
    stats = wait_until_idle(engine_stub)  # the abort lands before the engine's next step
    assert stats.num_running == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks


def test_side_routes(gateway, model):
    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200 and health.json() == {"tokenizer": "SERVING", "engine": "SERVING"}
    models = httpx.get(gateway.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == model
    tokens = httpx.post(gateway.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert httpx.post(gateway.url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {
        "prompt": "Hello world"
    }
    chat = httpx.post(gateway.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > tokens["count"]
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'tokenwire_http_requests_total{route="/tokenize",status="200"}' in metrics


def test_health_is_503_while_a_service_is_down(services):
    tokenizer, _ = services
    thread = GatewayThread(GatewayConfig(port=0, tokenizer=tokenizer.address, engine="127.0.0.1:1"))
    try:
        response = httpx.get(thread.url + "/health")
        assert response.status_code == 503 and response.json() == {"tokenizer": "SERVING", "engine": "NOT_SERVING"}
        with openai.OpenAI(base_url=thread.url + "/v1", api_key="x", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as err:
                client.models.list()
        assert err.value.status_code == 503
    finally:
        thread.close()


def test_bearer_token(services, model):
    tokenizer, engine = services
    thread = GatewayThread(
        GatewayConfig(port=0, tokenizer=tokenizer.address, engine=engine.address, auth_token="s3cret")
    )
    try:
        with openai.OpenAI(base_url=thread.url + "/v1", api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        with openai.OpenAI(base_url=thread.url + "/v1", api_key="s3cret", max_retries=0) as client:
            assert client.completions.create(model=model, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(thread.url + "/health").status_code == 200  # probes need no token
    finally:
        thread.close()


def test_429_under_a_bound_of_one(tiny_llama_dir, services):
    tokenizer, _ = services
    engine = EngineThread(
        EngineConfig(model=tiny_llama_dir, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=64)),
        ServerConfig(port=0, max_pending_requests=1),
    )
    thread = GatewayThread(GatewayConfig(port=0, tokenizer=tokenizer.address, engine=engine.address))
    try:
        with openai.OpenAI(base_url=thread.url + "/v1", api_key="x", max_retries=0) as client:
            model_name = client.models.list().data[0].id
            busy = client.completions.create(
                model=model_name, prompt="Hi", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
            )
            next(iter(busy))  # the one slot is taken
            with pytest.raises(openai.RateLimitError) as err:
                client.completions.create(model=model_name, prompt="Hi", max_tokens=2)
            assert err.value.status_code == 429 and err.value.body["type"] == "rate_limit_error"
            busy.close()
    finally:
        thread.close()
        engine.close()


LONE = "\\ud800"  # a lone surrogate, as JSON escapes it: valid JSON, not Unicode text
DEEP_SCHEMA = '{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        ("/v1/completions", f'{{"prompt": "Hi {LONE}"}}', "prompt"),
        ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{LONE}"}}]}}', "messages[0].content"),
        ("/v1/completions", f'{{"prompt": "Hi", "stop": ["{LONE}"]}}', "stop[0]"),
        ("/v1/completions", f'{{"prompt": "Hi", "model": "{LONE}"}}', "model"),
        ("/v1/completions", f'{{"prompt": "Hi", "guided_regex": "a{LONE}"}}', "guided_regex"),
        ("/tokenize", f'{{"prompt": "{LONE}"}}', "prompt"),
        ("/v1/completions", f'{{"prompt": "Hi", "max_tokens": {2**31}}}', "max_tokens"),
        ("/v1/completions", f'{{"prompt": "Hi", "top_k": {2**31}}}', "top_k"),
        (
            "/v1/completions",
            f'{{"prompt": [1, {2**32}]}}',
            "prompt",
        ),  # the token-id list as a whole: pydantic names the union field
        ("/v1/completions", f'{{"prompt": "Hi", "stop_token_ids": [{2**32}]}}', "stop_token_ids[0]"),
        ("/detokenize", f'{{"tokens": [{2**32}]}}', "tokens[0]"),
        ("/v1/completions", '{"prompt": "Hi", "logit_bias": {"-1": 1}}', "logit_bias"),
        ("/v1/completions", f'{{"prompt": "Hi", "logit_bias": {{"{2**32}": 1}}}}', "logit_bias"),
        ("/v1/completions", '{"prompt": "Hi", "temperature": NaN}', None),
        ("/v1/completions", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
        (
            "/v1/completions",
            '{"prompt": "Hi", "response_format": {"type": "json_object", "x": ' + "[" * 70 + "]" * 70 + "}}",
            "response_format",
        ),
        ("/v1/completions", json.dumps({"prompt": ["Hi"] * 3000}), "prompt"),
    ],
)
def test_input_no_field_type_refuses_is_a_400_not_a_500(gateway, route, raw, param):
    response = httpx.post(gateway.url + route, content=raw.encode(), timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_schema_nested_3000_deep_is_a_400(gateway):
    raw = '{"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
    response = httpx.post(gateway.url + "/v1/completions", content=(raw + DEEP_SCHEMA + "}}}").encode())
    assert response.status_code == 400 and "deeper than" in response.json()["error"]["message"]


def test_a_20000_parenthesis_regex_is_refused_with_a_bounded_message(gateway):
    body = {"prompt": "Hi", "max_tokens": 2, "guided_regex": "(" * 20_000 + "a" + ")" * 20_000}
    response = httpx.post(gateway.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == "guided_regex" and len(response.text) < 1000


def test_bodies_and_prompt_lists_past_their_flags(services):
    tokenizer, engine = services
    config = GatewayConfig(
        port=0, tokenizer=tokenizer.address, engine=engine.address, max_body_bytes=4096, max_prompts_per_request=2
    )
    thread = GatewayThread(config)
    try:
        big = httpx.post(thread.url + "/v1/completions", json={"prompt": "a" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
        three = httpx.post(thread.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 1})
        assert three.status_code == 400 and "--max-prompts-per-request" in three.json()["error"]["message"]
        two = httpx.post(thread.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1})
        assert two.status_code == 200 and len(two.json()["choices"]) == 2
    finally:
        thread.close()


def _read_until_closed(sock, limit_s: float = 20.0) -> bytes:
    """What the server sends until it closes the connection (b"" at once for a silent close)."""
    sock.settimeout(limit_s)  # a bound for a broken server, not a wait: the close ends it
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_silent_and_slowloris_connections_are_closed_and_the_rest_served(services):
    """A connection that opens and sends nothing, or a request head that never ends, is closed after
    --header-timeout-s; one that sent a request is answered, then closed once idle past
    --keep-alive-timeout-s; requests past --max-connections open connections get 503."""
    import socket

    tokenizer, engine = services
    config = GatewayConfig(
        port=0,
        tokenizer=tokenizer.address,
        engine=engine.address,
        header_timeout_s=1.0,
        keep_alive_timeout_s=1.0,
        max_connections=8,
    )
    thread = GatewayThread(config)
    address = ("127.0.0.1", thread.port)
    try:
        silent = [socket.create_connection(address) for _ in range(3)]
        slowloris = socket.create_connection(address)
        slowloris.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head's blank line never comes
        for sock in [*silent, slowloris]:
            assert _read_until_closed(sock) == b""
        served = socket.create_connection(address)
        served.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_until_closed(served).startswith(b"HTTP/1.1 200")  # answered, then closed when idle
        held = [socket.create_connection(address) for _ in range(8)]
        over = httpx.get(thread.url + "/v1/models")
        assert over.status_code == 503
        for sock in [*silent, slowloris, served, *held]:
            sock.close()
    finally:
        thread.close()

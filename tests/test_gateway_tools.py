"""Tools, template control and reasoning through the gateway, with the official `openai` client, over
the real services on loopback (tiny Llama with the SmolLM2 tokenizer and the shipped `chatml-tools`
template on both services)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.gateway.config import GatewayConfig
from tokenwire.tokenizer.chat_templates import template_text
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.v1 import engine_pb2 as pb
from transformers import AutoTokenizer

from tests.gateway_servers import GatewayThread
from tests.reference import ENGINE_DTYPE
from tests.servers import EngineThread, TokenizerThread

TEMPLATE = "chatml-tools"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {"query": {"type": "string", "maxLength": 16}},
    "required": ["query"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def services(tiny_llama_dir):
    tokenizer = TokenizerThread(TokenizerServiceConfig(model=tiny_llama_dir, port=0, chat_template=TEMPLATE))
    engine = EngineThread(
        EngineConfig(
            model=tiny_llama_dir, dtype=ENGINE_DTYPE, chat_template=TEMPLATE, cache=CacheConfig(num_blocks=512)
        ),
        ServerConfig(port=0),
    )
    yield tokenizer, engine
    engine.close()
    tokenizer.close()


@pytest.fixture(scope="module")
def gateway(services):
    tokenizer, engine = services
    thread = GatewayThread(GatewayConfig(port=0, tokenizer=tokenizer.address, engine=engine.address))
    yield thread
    thread.close()


@pytest.fixture(autouse=True)
def encodes_none(engine_stub):
    """After every test: the engine tokenized nothing itself (every gateway request reached it as ids)."""
    yield
    assert engine_stub.GetModelInfo(pb.GetModelInfoRequest()).stats.num_prompt_encodes == 0


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "search"}}], ids=["required", "named"]
)
def test_forced_calls_always_validate_against_the_schema(oai, model, tool_choice):
    """50 sampled choices (5 seeds x n=10): every one is a call with schema-valid arguments."""
    names = set()
    for seed in range(5):
        reply = oai.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            n=10,
            max_tokens=200,
        )
        assert len(reply.choices) == 10
        for choice in reply.choices:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            [(name, arguments)] = _calls(choice.message)
            jsonschema.validate(arguments, SCHEMAS[name])
            assert choice.message.tool_calls[0].id.startswith("call_")
            names.add(name)
    assert names <= ({"search"} if isinstance(tool_choice, dict) else set(SCHEMAS))


def test_parallel_calls_may_be_several(oai, model):
    reply = oai.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=1, n=4, max_tokens=400
    )
    for choice in reply.choices:
        if choice.finish_reason == "tool_calls":  # (a long run of calls may reach max_tokens)
            for name, arguments in _calls(choice.message):
                jsonschema.validate(arguments, SCHEMAS[name])
            assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)


def _accumulate(chunks) -> tuple[dict[int, dict], set[str | None]]:
    """The calls a stream's delta.tool_calls build, per call index, and the finish reasons."""
    calls: dict[int, dict] = {}
    finishes = set()
    for chunk in chunks:
        for choice in chunk.choices:
            finishes.add(choice.finish_reason)
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                if delta.id is not None:
                    assert call["id"] is None, "a call's id and name come once"
                    call["id"], call["name"] = delta.id, delta.function.name
                call["arguments"] += delta.function.arguments or ""
    return calls, finishes - {None}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_call_deltas_concatenate_to_the_whole_reply(oai, model, tool_choice):
    params = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, seed=7, max_tokens=200)
    whole = oai.chat.completions.create(**params, temperature=1.0, parallel_tool_calls=False)
    chunks = list(oai.chat.completions.create(**params, temperature=1.0, parallel_tool_calls=False, stream=True))
    calls, finishes = _accumulate(chunks)
    assert finishes == {"tool_calls"} == {whole.choices[0].finish_reason}
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert len([c for c in chunks if c.choices and c.choices[0].delta.tool_calls]) > 2  # arguments in pieces
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


def test_two_turns_with_a_tool_result_render_as_transformers_does(oai, model, gateway, tiny_llama_dir):
    first = oai.chat.completions.create(
        model=model,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        seed=3,
        max_tokens=200,
    )
    call = first.choices[0].message.tool_calls[0]
    conversation = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    ours = httpx.post(gateway.url + "/tokenize", json={"messages": conversation, "tools": TOOLS}, timeout=120).json()[
        "tokens"
    ]
    reference = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hf_conversation = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                }
            ],
        },
        conversation[2],
    ]
    expected = reference.apply_chat_template(
        hf_conversation, tools=TOOLS, chat_template=template_text(TEMPLATE), add_generation_prompt=True, tokenize=True
    )
    assert ours == list(getattr(expected, "input_ids", expected))
    text = reference.decode(ours)
    rendered = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)  # the template's tojson
    assert "<tool_response>" in text and '"arguments": ' + rendered in text
    second = oai.chat.completions.create(model=model, messages=conversation, tools=TOOLS, max_tokens=5, temperature=0)
    assert second.usage.prompt_tokens == len(ours)


def test_template_controls_render_as_transformers_does(gateway, tiny_llama_dir):
    reference = AutoTokenizer.from_pretrained(tiny_llama_dir)
    template = template_text(TEMPLATE)
    chat = [*ASK, {"role": "assistant", "content": "It is"}]

    def ours(**fields) -> list[int]:
        return httpx.post(gateway.url + "/tokenize", json={"messages": chat, **fields}, timeout=120).json()["tokens"]

    def theirs(**kwargs) -> list[int]:
        ids = reference.apply_chat_template(chat, chat_template=template, tokenize=True, **kwargs)
        return list(getattr(ids, "input_ids", ids))

    assert ours(continue_final_message=True) == theirs(continue_final_message=True)
    assert ours(add_generation_prompt=False) == theirs(add_generation_prompt=False)
    assert ours() == theirs(add_generation_prompt=True)
    assert ours(chat_template_kwargs={"unused": 1}) == ours()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (  # the forced call's grammar is the gateway's: a schema it cannot compile is the tools' fault
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),  # fmt: skip
    ],
)
def test_a_bad_tool_or_template_param_is_a_400_naming_it(gateway, model, body, param):
    reply = httpx.post(
        gateway.url + "/v1/chat/completions", json={"model": model, "messages": ASK, **body}, timeout=120
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_llama_dir):
    """A tokenizer service with the model's own template (which cannot render tools)."""
    thread = TokenizerThread(TokenizerServiceConfig(model=tiny_llama_dir, port=0))
    yield thread
    thread.close()


def test_a_template_without_tools_is_a_400_and_another_template_is_refused(services, plain_tokenizer, model):
    thread = GatewayThread(GatewayConfig(port=0, tokenizer=plain_tokenizer.address, engine=services[1].address))
    try:
        url = thread.url + "/v1/chat/completions"
        reply = httpx.post(url, json={"model": model, "messages": ASK, "tools": TOOLS}, timeout=120)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "tools"
        assert "--chat-template" in reply.json()["error"]["message"]
        # The fingerprint covers the template: ids rendered with another one are refused by the engine.
        reply = httpx.post(url, json={"model": model, "messages": ASK, "max_tokens": 2}, timeout=120)
        assert reply.status_code == 400 and "tokenizer" in reply.json()["error"]["message"]
    finally:
        thread.close()


@pytest.fixture(scope="module")
def thinking_gateway(services):
    tokenizer, engine = services
    thread = GatewayThread(
        GatewayConfig(port=0, tokenizer=tokenizer.address, engine=engine.address, reasoning_parser="qwen3")
    )
    yield thread
    thread.close()


def test_reasoning_is_split_from_content_streamed_as_whole(thinking_gateway, model, tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert len(tokenizer.encode("</think>")) > 1  # so the tags are cut across tokens
    body = {
        "model": model,
        "messages": ASK,
        "max_tokens": 60,
        "temperature": 1.0,
        "seed": 5,
        # The model is random: a regex gives it the shape of a thinking model's output.
        "guided_regex": r"<think>[a-z]{2,8}( [a-z]{2,8}){1,3}</think>\n[A-Z][a-z]{2,8}( [a-z]{2,8}){1,3}\.",
    }
    url = thinking_gateway.url + "/v1/chat/completions"
    whole = httpx.post(url, json=body, timeout=120).json()["choices"][0]["message"]
    assert whole["reasoning_content"] and whole["content"]
    assert "<think>" not in whole["content"] + whole["reasoning_content"]
    assert "</think>" not in whole["content"] + whole["reasoning_content"]
    assert not whole["content"].startswith("\n")
    with openai.OpenAI(base_url=thinking_gateway.url + "/v1", api_key="unused", max_retries=0) as client:
        given = {k: v for k, v in body.items() if k != "guided_regex"}
        chunks = list(
            client.chat.completions.create(**given, extra_body={"guided_regex": body["guided_regex"]}, stream=True)
        )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == whole["reasoning_content"]
    assert "".join(d.content or "" for d in deltas) == whole["content"]


def test_auto_parses_calls_out_of_the_output_streamed_as_whole(oai, model):
    """`auto`: the model's own text is parsed; a regex makes the random model write a Hermes block."""
    regex = r'Checking\.\n<tool_call>\n\{"name": "search", "arguments": \{"query": "[a-z]{1,10}"\}\}\n</tool_call>'
    params = dict(model=model, messages=ASK, tools=TOOLS, seed=2, temperature=1.0, max_tokens=80)
    whole = oai.chat.completions.create(**params, extra_body={"guided_regex": regex})
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    [(name, arguments)] = _calls(choice.message)
    assert name == "search"
    jsonschema.validate(arguments, SEARCH)
    chunks = list(oai.chat.completions.create(**params, extra_body={"guided_regex": regex}, stream=True))
    calls, finishes = _accumulate(chunks)
    assert finishes == {"tool_calls"}
    assert [(calls[0]["name"], calls[0]["arguments"])] == [(name, choice.message.tool_calls[0].function.arguments)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking."
    plain = oai.chat.completions.create(**params, tool_choice="none", extra_body={"guided_regex": regex})
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "stop"


def test_with_a_reasoning_parser_structured_output_and_forced_calls_hold_the_answer_only(thinking_gateway, model):
    """The random model may open a think block it never closes (then it runs to max_tokens): every answer that
    ends on its own validates, and most do, since thinking must open with `<`."""
    url = thinking_gateway.url + "/v1/chat/completions"
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SEARCH}}
    schema_ends, call_ends = 0, 0
    for seed in range(6):
        base = {"model": model, "messages": ASK, "temperature": 1.0, "seed": seed, "max_tokens": 60}
        reply = httpx.post(url, json=base | {"response_format": fmt}, timeout=120).json()
        assert "choices" in reply, reply
        message = reply["choices"][0]
        if message["finish_reason"] == "stop":
            jsonschema.validate(json.loads(message["message"]["content"]), SEARCH)
            schema_ends += 1
        forced = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
        choice = httpx.post(url, json=base | forced, timeout=120).json()["choices"][0]
        if choice["finish_reason"] == "tool_calls":
            (call,) = choice["message"]["tool_calls"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])
            call_ends += 1
    assert schema_ends >= 3 and call_ends >= 3

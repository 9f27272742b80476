"""The gateway's readers of chat output, on canned model text: the Hermes tool-call parser (`auto`), the
`<think>` reasoning parsers, and the forced-call grammar. However the text is cut into chunks, the deltas
concatenate to the whole message."""

from __future__ import annotations

import json

import jsonschema
import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenwire.gateway import reasoning, tool_parsers
from tokenwire.gateway.chat_output import ChoiceReader
from tokenwire.gateway.protocol import ChatCompletionRequest
from tokenwire.gateway.tools import plan

CANNED = {
    "two calls and a preamble": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "at": {"h": 12}}}\n'
        '</tool_call>\n<tool_call>\n{"arguments": {"q": "}"}, "name": "search"}\n</tool_call>\n'
    ),
    "compact": '<tool_call>{"name":"f","arguments":{}}</tool_call>',
    "not json": "<tool_call>not json</tool_call> and then text",
    "unclosed": '<tool_call>\n{"name": "f", "arguments": {"a": "}"}}\n',
    "cut in the closing tag": '<tool_call>\n{"name": "f", "arguments": {"a": {"b": 1}}}\n</tool',
    "string arguments": '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
    "parameters key": '<tool_call>{"parameters": {"a": 1}, "name": "f"}</tool_call>',
    "plain text with a tag-like start": "Use <tool to call <tool_cal things",
    "reasoning then a call": '<think>The user wants weather.</think>\n\n<tool_call>{"name": "f", "arguments": {"x": [1, 2]}}</tool_call>',
    "reasoning cut short": "<think>still thinking",
    "no reasoning": "Hello <think>",
}
EXPECTED_CALLS = {
    "two calls and a preamble": [("get_weather", {"city": "Paris", "at": {"h": 12}}), ("search", {"q": "}"})],
    "compact": [("f", {})],
    "not json": [],
    "unclosed": [("f", {"a": "}"})],
    "cut in the closing tag": [("f", {"a": {"b": 1}})],
    "string arguments": [("f", {"a": 1})],
    "parameters key": [("f", {"a": 1})],
    "plain text with a tag-like start": [],
    "reasoning then a call": [("f", {"x": [1, 2]})],
    "reasoning cut short": [],
    "no reasoning": [],
}


def reader(think: str = "qwen3", tools: str | None = "hermes") -> ChoiceReader:
    return ChoiceReader(reasoning.make(think), tool_parsers.make(tools) if tools else None)


def whole(text: str, **kwargs) -> dict:
    r = reader(**kwargs)
    r.feed(text)
    r.finish()
    return r.message()


def streamed(text: str, cuts: list[int], **kwargs) -> dict:
    """The message a client builds from the deltas of `text` fed in pieces cut at `cuts`."""
    r = reader(**kwargs)
    bounds = [0, *sorted(set(cuts)), len(text)]
    deltas = [r.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [r.finish()]
    content = "".join(d.content for d in deltas)
    thinking = "".join(d.reasoning for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for c in d.calls:
            if c.id is not None:
                assert c.index not in calls
                calls[c.index] = {"name": c.name, "arguments": ""}
            calls[c.index]["arguments"] += c.arguments
    return {"content": content, "reasoning": thinking, "calls": [calls[i] for i in sorted(calls)]}


def comparable(message: dict) -> dict:
    return {
        "content": message["content"] or "",
        "reasoning": message.get("reasoning_content", ""),
        "calls": [
            {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls", [])
        ],
    }


@pytest.mark.parametrize("name", sorted(CANNED))
def test_auto_reads_canned_outputs(name):
    message = whole(CANNED[name])
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    assert calls == EXPECTED_CALLS[name]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message.get("tool_calls", []))
    if calls:
        assert "<tool_call>" not in (message["content"] or "")


def test_content_around_calls():
    assert whole(CANNED["two calls and a preamble"])["content"] == "Let me check."
    assert whole(CANNED["compact"])["content"] is None
    assert whole(CANNED["not json"])["content"] == CANNED["not json"]
    assert whole(CANNED["plain text with a tag-like start"])["content"] == CANNED["plain text with a tag-like start"]
    assert whole("Hi \n", tools="hermes")["content"] == "Hi \n"  # no call: trailing whitespace kept


def test_reasoning_split():
    assert whole(CANNED["reasoning then a call"])["reasoning_content"] == "The user wants weather."
    assert whole(CANNED["reasoning cut short"], tools=None) == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "still thinking",
    }
    assert "reasoning_content" not in whole(CANNED["no reasoning"])  # qwen3: only an opening <think> reasons
    r1 = whole("the prompt opened it</think>\n\nAnswer.", think="deepseek_r1", tools=None)
    assert (r1["reasoning_content"], r1["content"]) == ("the prompt opened it", "Answer.")
    assert whole("<think>x</think>y", think="deepseek_r1", tools=None)["reasoning_content"] == "x"


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_chunking_concatenates_to_the_whole_message(data):
    name = data.draw(st.sampled_from(sorted(CANNED)))
    think = data.draw(st.sampled_from(["qwen3", "deepseek_r1"]))
    text = CANNED[name]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    assert streamed(text, cuts, think=think) == comparable(whole(text, think=think))


def test_every_single_character_chunking():
    for text in CANNED.values():
        assert streamed(text, list(range(len(text)))) == comparable(whole(text))


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_plans():
    assert plan(request(), "hermes").parser is None
    assert (
        plan(request(tools=[TOOL]), "hermes").parser == "hermes"
        and plan(request(tools=[TOOL]), "hermes").grammar is None
    )
    assert plan(request(tools=[TOOL], tool_choice="none"), "hermes").parser is None
    assert plan(request(tools=[TOOL], tool_choice="none"), "hermes").tools[0]["function"]["name"] == "get_weather"
    forced = plan(request(tools=[TOOL], tool_choice="required"), "hermes")
    assert forced.parser == "hermes" and forced.grammar


@pytest.mark.parametrize("parallel", [False, True])
def test_the_forced_grammar_takes_exactly_valid_calls(parallel):
    grammar = plan(request(tools=[TOOL], tool_choice="required", parallel_tool_calls=parallel), "hermes").grammar
    lark = llguidance.LLMatcher.grammar_from_lark(grammar)
    assert llguidance.LLMatcher.validate_grammar(lark) == ""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'
    parsed = whole(call, tools="hermes")["tool_calls"]
    jsonschema.validate(json.loads(parsed[0]["function"]["arguments"]), TOOL["function"]["parameters"])
    assert ('("\\n" call)*' in grammar) == parallel
    assert '"x-guidance": {"whitespace_flexible": false}' in grammar  # compact arguments


LLAMA3 = {
    '{"name": "f", "parameters": {"a": 1}}': [("f", {"a": 1})],
    '<|python_tag|>{"name": "f", "parameters": {"a": ";"}}; {"name": "g", "parameters": {}}': [
        ("f", {"a": ";"}),
        ("g", {}),
    ],
    "Just text {not a call}": [],
    '{"broken": ': [],
}


@pytest.mark.parametrize("text", sorted(LLAMA3))
def test_llama3_json_reads_bare_calls_at_any_chunking(text):
    message = whole(text, tools="llama3_json")
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])]
    assert calls == LLAMA3[text]
    assert (message["content"] is None) == bool(calls) and (calls or message["content"] == text)
    for step in (1, 2, 5):
        cuts = list(range(0, len(text), step))
        assert streamed(text, cuts, tools="llama3_json") == comparable(message)


# ---- with a reasoning parser, a constraint holds the answer only ----

ANSWER_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def _accepts(tokenizer, grammar: str, text: str) -> bool:
    import llguidance.hf

    matcher = llguidance.LLMatcher(
        llguidance.hf.from_tokenizer(tokenizer), llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


@pytest.mark.parametrize(
    "parser, text, ok",
    [
        ("qwen3", '<think>first, a is one</think>\n\n{"a":1}', True),
        ("qwen3", '{"a":12}', True),  # no thinking at all
        ("qwen3", "<think>x</think>\nnot json", False),
        ("qwen3", '<think>x</think>{"b":1}', False),
        ("deepseek_r1", 'the prompt opened the block</think>\n{"a":3}', True),
        ("deepseek_r1", '{"a":3}', False),  # the think text ends with </think>, always
    ],
)
def test_a_schema_holds_the_answer_only_when_the_model_thinks(smollm2_dir, parser, text, ok):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    option = reasoning.answer_only({"json_schema": ANSWER_SCHEMA}, parser)
    assert _accepts(tokenizer, option["grammar"], text) is ok


def test_a_forced_call_holds_the_answer_only_when_the_model_thinks(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": ANSWER_SCHEMA}}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        }
    )
    option = reasoning.answer_only({"grammar": plan(request, "hermes").grammar}, "qwen3")
    call = '<tool_call>\n{"name": "f", "arguments": {"a":2}}\n</tool_call>'
    assert _accepts(tokenizer, option["grammar"], "<think>call f</think>\n" + call)
    assert _accepts(tokenizer, option["grammar"], call)
    assert not _accepts(tokenizer, option["grammar"], "<think>call f</think>\nno call")

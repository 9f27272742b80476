"""Prompt logprobs and min_tokens over the real services (tiny Llama, loopback, port 0): through the SDK
(`prompt_logprobs`), and through the gateway's /v1/completions as OpenAI's legacy `echo` + `logprobs`
(and `max_tokens: 0`), held against transformers' log-softmax over the same prompt ids; best_of and
unknown parameters."""

from __future__ import annotations

import logging

import grpc
import openai
import pytest
import torch
from tokenwire.client import Client
from tokenwire.client.errors import InvalidRequestError
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig, ServerConfig
from tokenwire.gateway.config import GatewayConfig
from tokenwire.tokenizer.config import TokenizerServiceConfig
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

from tests.gateway_servers import GatewayThread
from tests.reference import ENGINE_DTYPE, EXACT, hf_model
from tests.servers import EngineThread, TokenizerThread

TOL = 1e-4 if EXACT else 0.25
BUDGET = 32  # tokens per engine step: LONG is prefilled in several chunks
PROMPT = "The quick brown fox jumps over the lazy dog, and then"
LONG = " ".join(["a story about a small village by the sea"] * 12)


@pytest.fixture(scope="module")
def services(tiny_llama_dir):
    tokenizer = TokenizerThread(TokenizerServiceConfig(model=tiny_llama_dir, port=0))
    engine = EngineThread(
        EngineConfig(
            model=tiny_llama_dir,
            dtype=ENGINE_DTYPE,
            cache=CacheConfig(num_blocks=512, block_size=4),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=BUDGET),
        ),
        ServerConfig(port=0),
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


@pytest.fixture(scope="module")
def sdk(services):
    tokenizer, engine = services
    with Client(tokenizer.address, engine.address) as client:
        yield client


@pytest.fixture(autouse=True)
def encodes_nothing(services):
    """After every test: the engine tokenized nothing itself (every request reached it as ids)."""
    yield
    with grpc.insecure_channel(services[1].address) as channel:
        stats = engine_pb2_grpc.EngineServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest()).stats
    assert stats.num_prompt_encodes == 0


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    hf = hf_model(tiny_llama_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab]: row i is the distribution after ids[: i + 1]."""
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return logprobs


def assert_sdk_entries_match(entries, ids, expected: torch.Tensor, n: int) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    for i in range(1, len(ids)):
        entry, row = entries[i], expected[i - 1]
        assert entry.token_id == ids[i] and abs(entry.logprob - float(row[ids[i]])) <= TOL
        assert {t for t, _ in entry.top} == set(row.topk(n).indices.tolist()) or not EXACT  # bf16: near-ties
        assert all(abs(v - float(row[t])) <= TOL for t, v in entry.top)


@pytest.mark.parametrize("text", [PROMPT, LONG], ids=["one-chunk", "several-chunks"])
def test_sdk_prompt_logprobs_match_transformers(sdk, reference, text):
    ids = sdk.encode(text)
    assert text is PROMPT or len(ids) > BUDGET
    done = sdk.complete(token_ids=ids, max_new_tokens=2, temperature=0, prompt_logprobs=3)
    assert_sdk_entries_match(done.prompt_logprobs, ids, reference(ids), 3)
    assert len(done.token_ids) == 2
    # The prompt is in the prefix cache now: the same request again is recomputed, identically.
    again = sdk.complete(token_ids=ids, max_new_tokens=2, temperature=0, prompt_logprobs=3)
    assert again.prompt_logprobs == done.prompt_logprobs and again.usage.cached_prompt_tokens == 0
    assert sdk.complete(token_ids=ids, max_new_tokens=1).usage.cached_prompt_tokens > 0
    streamed = list(sdk.generate(token_ids=ids, max_new_tokens=2, temperature=0, prompt_logprobs=3))
    assert streamed[0].prompt_logprobs == done.prompt_logprobs
    assert all(c.prompt_logprobs == () for c in streamed[1:])


def test_sdk_scores_a_prompt_without_generating(sdk, reference):
    ids = sdk.encode(PROMPT)
    done = sdk.complete(token_ids=ids, max_new_tokens=0, prompt_logprobs=0)
    assert done.token_ids == () and done.text == "" and done.finish_reason.value == "length"
    assert done.usage.completion_tokens == 0
    assert_sdk_entries_match(done.prompt_logprobs, ids, reference(ids), 0)


def test_sdk_batch_carries_prompt_logprobs(sdk, reference):
    prompts = [sdk.encode(PROMPT), sdk.encode(LONG)]
    results = sdk.complete_batch(token_ids=prompts, max_new_tokens=1, prompt_logprobs=1)
    for ids, result in zip(prompts, results):
        assert_sdk_entries_match(result.prompt_logprobs, ids, reference(ids), 1)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"prompt_logprobs": 21}, "sampling.prompt_logprobs"),
        ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"max_new_tokens": 3, "min_tokens": 4}, "sampling.min_tokens"),
    ],
)
def test_sdk_bad_values_are_invalid_argument_naming_the_field(sdk, options, field):
    with pytest.raises(InvalidRequestError) as error:
        sdk.complete(token_ids=[1, 2, 3], **options)
    assert error.value.field == field


def legacy_block(oai, model, prompt, **kwargs):
    return oai.completions.create(model=model, prompt=prompt, temperature=0, echo=True, **kwargs).choices[0]


def test_echo_with_logprobs_is_openais_legacy_shape(oai, model, sdk, reference):
    ids = sdk.encode(PROMPT)
    choice = legacy_block(oai, model, PROMPT, max_tokens=3, logprobs=2)
    plain = oai.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=3, logprobs=2).choices[0]
    block, expected = choice.logprobs, reference(ids)
    assert choice.text == PROMPT + plain.text
    assert len(block.tokens) == len(ids) + 3
    assert block.token_logprobs[0] is None and block.top_logprobs[0] is None and block.text_offset[0] == 0
    names: dict[int, str] = {}
    for i in range(1, len(ids)):
        row = expected[i - 1]
        assert abs(block.token_logprobs[i] - float(row[ids[i]])) <= TOL
        top = row.topk(2).indices.tolist()
        names.update({t: sdk.decode([t], skip_special_tokens=False) for t in top if t not in names})
        assert set(block.top_logprobs[i]) == {names[t] for t in top} or not EXACT
    assert "".join(block.tokens[: len(ids)]) == PROMPT
    # The generated part is what the same request without echo returns, placed after the prompt text.
    assert block.tokens[len(ids) :] == plain.logprobs.tokens
    # (within TOL: the plain request's prompt came from the prefix cache, a different batch shape)
    assert block.token_logprobs[len(ids) :] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)
    assert block.text_offset[len(ids)] == len(PROMPT)
    offsets = block.text_offset[: len(ids)]
    assert offsets == sorted(offsets) and offsets[1] == len(block.tokens[0])


def test_echo_logprobs_with_max_tokens_zero_and_ids(oai, model, sdk, reference):
    ids = sdk.encode(LONG)  # longer than one prefill chunk
    done = oai.completions.create(model=model, prompt=ids, temperature=0, echo=True, max_tokens=0, logprobs=1, n=2)
    assert done.usage.completion_tokens == 0 and len(done.choices) == 2
    expected = reference(ids)
    for choice in done.choices:  # every sample echoes the prompt with its logprobs
        assert choice.finish_reason == "length" and choice.text == sdk.decode(ids)
        block = choice.logprobs
        assert len(block.tokens) == len(ids) and block.token_logprobs[0] is None
        assert all(abs(block.token_logprobs[i] - float(expected[i - 1, ids[i]])) <= TOL for i in range(1, len(ids)))
        assert all(len(top) == 1 for top in block.top_logprobs[1:])


def test_max_tokens_zero_without_echo_is_empty(oai, model):
    done = oai.completions.create(model=model, prompt=PROMPT, max_tokens=0)
    assert done.choices[0].text == "" and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 0 and done.usage.prompt_tokens > 0


def test_echo_logprobs_stream_equals_whole_and_every_sample_has_the_prompt(oai, model, sdk):
    num_prompt = len(sdk.encode(PROMPT))
    whole = oai.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2, n=2)
    first, second = (c.logprobs for c in sorted(whole.choices, key=lambda c: c.index))
    assert len(first.tokens) == len(second.tokens) == num_prompt + 4
    assert first.tokens[:num_prompt] == second.tokens[:num_prompt]
    assert first.token_logprobs[:num_prompt] == second.token_logprobs[:num_prompt]
    chunks = list(
        oai.completions.create(
            model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True
        )
    )
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    one = oai.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    block = one.choices[0].logprobs
    assert tokens == block.tokens and values == block.token_logprobs and offsets == block.text_offset
    assert "".join(c.choices[0].text for c in chunks if c.choices) == one.choices[0].text
    assert block.token_logprobs[:num_prompt] == first.token_logprobs[:num_prompt]


def test_min_tokens_holds_against_eos_forced_by_logit_bias(oai, model, sdk):
    eos = sdk.model_info().eos_token_ids[0]
    forced = {"logit_bias": {str(eos): 100}}
    at_once = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, extra_body=forced)
    assert at_once.usage.completion_tokens == 1 and at_once.choices[0].finish_reason == "stop"
    held = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, extra_body=forced | {"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    chat = oai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=10, extra_body=forced | {"min_tokens": 3}
    )
    assert chat.usage.completion_tokens == 4 and chat.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "params, param",
    [
        ({"best_of": 2}, "best_of"),  # more samples than returned: not supported
        ({"best_of": 0}, "best_of"),
        ({"suffix": "!"}, "suffix"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),  # refused by the engine: sampling.min_tokens
        ({"min_tokens": -1}, "min_tokens"),
        ({"echo": True, "logprobs": 21}, "logprobs"),
    ],
)
def test_refused_params_are_a_400_naming_them(oai, model, params, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=model, prompt="Hello", extra_body=params)
    assert err.value.status_code == 400 and err.value.body["param"] == param


def test_best_of_equal_to_n_is_served(oai, model):
    done = oai.completions.create(model=model, prompt="Hello", max_tokens=2, n=2, best_of=2, seed=1)
    assert sorted(c.index for c in done.choices) == [0, 1]


def test_unknown_params_are_ignored_with_one_warning(oai, model, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenwire.gateway.routes"):
        done = oai.completions.create(
            model=model, prompt="Hi", max_tokens=2, extra_body={"no_such_option": 1, "another_one": "x"}
        )
    assert done.usage.completion_tokens == 2
    warnings = [r for r in caplog.records if r.name == "tokenwire.gateway.routes"]
    assert len(warnings) == 1 and "another_one, no_such_option" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "params, param",
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ],
)
def test_known_unsupported_chat_params_are_a_400_naming_them(oai, model, params, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body=params
        )
    assert err.value.status_code == 400 and err.value.body["param"] == param
    assert err.value.body["message"].startswith(param)


def test_a_value_asking_for_nothing_passes(oai, model, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenwire.gateway.routes"):
        done = oai.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, extra_body={"modalities": ["text"]}
        )
    assert done.usage.completion_tokens == 2
    assert not [r for r in caplog.records if r.name == "tokenwire.gateway.routes"]  # known, so no warning

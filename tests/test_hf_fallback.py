"""The transformers fallback (models/hf_fallback.py) against transformers `generate()`.

GPT-NeoX (partial rotary, parallel residuals) and OPT (learned positions offset by 2) have no tokenwire
forward: `--model-impl auto` runs their own HF modules over the paged KV cache. Tiny random 2-layer
configs (tests/tiny_models.py), greedy token-exact in fp32 at batch 8 and 1 with 5-token prefill chunks,
prefix-cache hits with preemptions, native kernels on and off. Forced onto families tokenwire does serve,
the fallback matches the native path (Llama) and HF's own sliding window and soft-caps (Gemma 2).
Encoder-only models are refused at startup, naming the architecture and the reason.
"""

from __future__ import annotations

import json
import random

import grpc
import pytest
import torch
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.worker.model_runner import ModelRunner
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc
from transformers import BertConfig, BloomConfig

from tests.reference import ENGINE_DTYPE, assert_greedy_matches_reference, assert_runs_agree
from tests.test_engine_service import ServerThread
from tests.test_model_runner import BLOCK_SIZE, NEW_TOKENS, contiguous_tables, make_seqs, run_greedy
from tests.test_speculative import copy_heavy_prompts, plain_prompts
from tests.tiny_models import build_echo_llama, build_tiny_fallback, build_tiny_family

FAMILIES = {"gpt_neox": "GPTNeoXForCausalLM", "opt": "OPTForCausalLM"}
PROMPT_LENGTHS = (1, 4, 7, 11, 16, 23, 29, 37)  # batch 8


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, smollm2_dir, tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, str(build_tiny_fallback(request.param, smollm2_dir, out))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in PROMPT_LENGTHS]


def _runner(model_dir: str, model_impl: str = "auto", native: bool = True) -> ModelRunner:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=128)
    config = EngineConfig(
        model=model_dir, dtype=ENGINE_DTYPE, native_kernels=native, model_impl=model_impl, cache=cache
    )
    return ModelRunner(config)


def _greedy(runner: ModelRunner, prompts: list[list[int]], budget: int | None = None) -> list[list[int]]:
    seqs = make_seqs(prompts, contiguous_tables(prompts, NEW_TOKENS))
    run_greedy(runner, seqs, NEW_TOKENS, budget=budget)
    return [s.output_token_ids for s in seqs]


@pytest.mark.parametrize("native", [True, False], ids=["native-kernels", "torch"])
def test_batch_of_8_and_1_with_chunked_prefill_match_hf(family_dir, prompts, native):
    family, model_dir = family_dir
    runner = _runner(model_dir, native=native)
    assert (runner.architecture, runner.model_impl) == (FAMILIES[family], "transformers")
    assert (runner.native is not None) == native
    assert_greedy_matches_reference(model_dir, prompts, _greedy(runner, prompts, budget=5))
    assert_greedy_matches_reference(model_dir, prompts[-1:], _greedy(runner, prompts[-1:]))


def test_prefix_cache_hits_and_preemption_match_hf(family_dir):
    _, model_dir = family_dir
    rng = random.Random(3)
    shared = [rng.randrange(3, 49152) for _ in range(16)]  # 4 full blocks
    prompts = [shared + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 6))] for _ in range(6)]
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=ENGINE_DTYPE,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=20, enable_prefix_cache=True),
            scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=12, enable_chunked_prefill=True),
        )
    )
    assert engine.runner.model_impl == "transformers"
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompt_token_ids=prompts, params=params)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks  # every block back after preemptions
    assert_greedy_matches_reference(model_dir, prompts, outputs)


def test_forced_on_llama_matches_the_native_path(tiny_llama_dir, prompts):
    native, fallback = _runner(tiny_llama_dir), _runner(tiny_llama_dir, model_impl="transformers")
    assert (native.model_impl, fallback.model_impl) == ("native", "transformers")
    assert native.architecture == fallback.architecture == "LlamaForCausalLM"
    got = _greedy(fallback, prompts, budget=7)
    assert_runs_agree(tiny_llama_dir, prompts, got, _greedy(native, prompts, budget=7))
    assert_greedy_matches_reference(tiny_llama_dir, prompts, got)


def test_forced_on_gemma2_keeps_hf_window_and_soft_caps(smollm2_dir, tmp_path, prompts):
    """Gemma 2's sliding window and attention soft-cap reach the attention function as kwargs, its final
    logit soft-cap runs in the HF forward: the fallback matches generate() with prompts past the window."""
    model_dir = str(build_tiny_family("gemma2", smollm2_dir, tmp_path / "gemma2"))
    runner = _runner(model_dir, model_impl="transformers")
    assert runner.model_impl == "transformers"
    assert_greedy_matches_reference(model_dir, prompts, _greedy(runner, prompts, budget=5))


def test_speculative_drafts_verify_through_the_fallback(smollm2_dir, tmp_path):
    """n-gram drafts are verified as a multi-token chunk over cached context: accepted and rejected drafts
    through the HF modules leave greedy outputs equal to speculation off."""
    model_dir = str(build_echo_llama(smollm2_dir, tmp_path / "echo"))
    prompts = plain_prompts(4, seed=1) + copy_heavy_prompts(4, seed=3)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)

    def engine(speculative: str) -> LLMEngine:
        scheduler = SchedulerConfig(
            max_num_seqs=16, max_num_batched_tokens=64, speculative=speculative, speculative_max_num_seqs=8
        )
        cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=256)
        return LLMEngine(
            EngineConfig(
                model=model_dir, dtype=ENGINE_DTYPE, model_impl="transformers", cache=cache, scheduler=scheduler
            )
        )

    spec = engine("ngram")
    got = spec.generate(prompt_token_ids=prompts, params=params)
    assert_runs_agree(model_dir, prompts, got, engine("off").generate(prompt_token_ids=prompts, params=params))
    stats = spec.stats()
    assert 0 < stats.num_accepted_draft_tokens < stats.num_draft_tokens


def test_model_info_and_the_log_name_the_fallback(family_dir, caplog, capfd):
    _, model_dir = family_dir
    config = EngineConfig(model=model_dir, dtype="float32", cache=CacheConfig(num_blocks=32))
    with caplog.at_level("INFO"):  # the engine core logs at the level it is started under
        thread = ServerThread(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{thread.port}") as channel:
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            assert (info.architecture, info.config.model_impl) == (FAMILIES[family_dir[0]], "transformers")
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]))
            request.sampling.max_new_tokens, request.sampling.temperature = 3, 0.0
            assert len([i for r in stub.Generate(request) for i in r.token_ids]) == 3
    finally:
        thread.close()
    # The engine core is a child process: its startup lines reach the inherited stderr.
    assert f"({FAMILIES[family_dir[0]]}, transformers forward)" in capfd.readouterr().err


def test_dtype_auto_runs_the_fallback_in_float32_on_a_cpu(family_dir):
    """The HF modules' own bf16 ops decode several times slower than fp32 on CPUs (README)."""
    config = EngineConfig(model=family_dir[1], dtype="auto", device="cpu", cache=CacheConfig(num_blocks=8))
    assert ModelRunner(config).dtype == torch.float32


@pytest.mark.parametrize("model_impl", ["auto", "transformers"])
def test_an_encoder_only_model_is_refused_naming_architecture_and_reason(tmp_path, model_impl):
    BertConfig(
        architectures=["BertForMaskedLM"], vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)  # the config alone: refused before any weight is read
    with pytest.raises(ValueError, match=r"BertForMaskedLM .*encoder-only.*bidirectional"):
        _runner(str(tmp_path), model_impl=model_impl)


def test_a_bad_model_impl_is_refused_naming_the_field(tiny_llama_dir):
    with pytest.raises(ValueError, match="model_impl: one of auto, native, transformers, got 'vllm'"):
        _runner(tiny_llama_dir, model_impl="vllm")


def test_an_encoder_decoder_is_refused(tmp_path):
    config = {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="T5ForConditionalGeneration .*encoder-decoder"):
        _runner(str(tmp_path))


def test_a_model_outside_the_attention_interface_is_refused(tmp_path):
    """BLOOM adds its ALiBi bias inside its own attention, which no registered function replaces."""
    BloomConfig(
        architectures=["BloomForCausalLM"], vocab_size=128, hidden_size=32, n_layer=1, n_head=2
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"BloomForCausalLM .*does not call transformers' attention interface"):
        _runner(str(tmp_path))

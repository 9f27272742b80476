"""Gemma 3, Gemma 2, Mistral and Phi-3 on the native forwards against transformers `generate()`.

Tiny random 4-layer configs (tests/tiny_models.py): Gemma's sliding and global layers interleave with a
6-token window shorter than most prompts, so chunked prefill crosses the window edge; every Mistral layer
slides, so the blocks behind its window go back to the pool mid-sequence; Phi-3 carries longrope factors
and pre-fused qkv/gate_up. Each runs with the native kernels on and off.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.worker.model_runner import ModelRunner

from tests.reference import ENGINE_DTYPE, assert_greedy_matches_reference
from tests.test_model_runner import BLOCK_SIZE, NEW_TOKENS, contiguous_tables, make_seqs, run_greedy
from tests.tiny_models import TINY_WINDOW, build_tiny_family

ALL_SLIDING = {"mistral"}  # families whose every layer has a window

FAMILIES = {
    "gemma3": "Gemma3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
PROMPT_LENGTHS = (1, 4, 7, 11, 16, 23, 29, 37)  # batch 8; most longer than the window


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request, smollm2_dir, tmp_path_factory) -> tuple[str, str]:
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return request.param, str(build_tiny_family(request.param, smollm2_dir, out))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(17)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in PROMPT_LENGTHS]


def _runner(model_dir: str, native: bool) -> ModelRunner:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=128)
    return ModelRunner(EngineConfig(model=model_dir, dtype=ENGINE_DTYPE, native_kernels=native, cache=cache))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_batch_of_8_and_1_with_chunks_across_the_window_match_hf(family_dir, prompts, native):
    family, model_dir = family_dir
    runner = _runner(model_dir, native)
    assert runner.architecture == FAMILIES[family]
    assert (runner.native is not None) == native
    assert max(PROMPT_LENGTHS) > TINY_WINDOW
    seqs = make_seqs(prompts, contiguous_tables(prompts, NEW_TOKENS))
    run_greedy(runner, seqs, NEW_TOKENS, budget=5)  # chunk edges fall inside and past the window
    assert_greedy_matches_reference(model_dir, prompts, [s.output_token_ids for s in seqs])
    (alone,) = make_seqs(prompts[-1:], contiguous_tables(prompts[-1:], NEW_TOKENS))
    run_greedy(runner, [alone], NEW_TOKENS)
    assert_greedy_matches_reference(model_dir, prompts[-1:], [alone.output_token_ids])


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_prefix_cache_hits_and_preemption_match_hf(family_dir, native):
    family, model_dir = family_dir
    # Sequences of an all-sliding model hold only their window's blocks: a smaller pool still runs dry.
    num_blocks = 10 if family in ALL_SLIDING else 20
    rng = random.Random(3)
    shared = [rng.randrange(3, 49152) for _ in range(16)]  # 4 full blocks, past the window
    prompts = [shared + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 6))] for _ in range(6)]
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=ENGINE_DTYPE,
            native_kernels=native,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, enable_prefix_cache=True),
            scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=12, enable_chunked_prefill=True),
        )
    )
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompt_token_ids=prompts, params=params)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0
    assert_greedy_matches_reference(model_dir, prompts, outputs)


def test_model_type_alone_selects_the_family(family_dir, tmp_path):
    family, model_dir = family_dir
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.pop("architectures")  # as a GGUF-loaded config: model_type only
    (copy / "config.json").write_text(json.dumps(config))
    assert _runner(str(copy), native=False).architecture == FAMILIES[family]


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("family", ["mistral", "gemma3"])  # every layer slides; some layers are global
def test_blocks_behind_the_window_go_back_only_where_every_layer_slides(family, native, smollm2_dir, tmp_path):
    """Long sequences on a small pool: where every layer slides, each holds about window / block_size
    blocks however long it grows, the blocks it gave back serve the others (prefix cache on, chunked
    prefill), and greedy still equals generate(); a global layer keeps every block."""
    model_dir = str(build_tiny_family(family, smollm2_dir, tmp_path))
    rng = random.Random(8)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (9, 26, 31)]
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=ENGINE_DTYPE,
            native_kernels=native,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=64, enable_prefix_cache=True),
            scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, enable_chunked_prefill=True),
        )
    )
    manager = engine.block_manager
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=p, params=params) for p in prompts]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    most_held = 0
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        held = [manager.num_held_blocks(s) for s in engine.scheduler.running]
        most_held = max([most_held, *held])
        if family not in ALL_SLIDING:  # Gemma: the global layers read every block
            assert held == [len(s.block_table) for s in engine.scheduler.running]
    longest = -(-(max(map(len, prompts)) + 40) // BLOCK_SIZE)
    if family in ALL_SLIDING:
        assert manager.window == TINY_WINDOW
        # the window's blocks, the one being written and one the next query may still need
        assert most_held <= -(-TINY_WINDOW // BLOCK_SIZE) + 2 < longest
    else:
        assert manager.window is None and most_held >= longest - 1
    assert manager.num_used_blocks == 0  # every finished sequence gave back all it still held
    assert_greedy_matches_reference(model_dir, prompts, [outputs[i] for i in ids])


def test_drafts_on_an_all_sliding_model_roll_back_without_touching_given_back_blocks(smollm2_dir, tmp_path):
    """Speculation and window release together: prompts that repeat themselves draft from the first step,
    rejected drafts roll back over tables whose leading blocks went back, and greedy equals generate()."""
    model_dir = str(build_tiny_family("mistral", smollm2_dir, tmp_path))
    rng = random.Random(4)
    patterns = [[rng.randrange(3, 49152) for _ in range(n)] for n in (3, 5, 7)]
    prompts = [(p * 8)[: 20 + 3 * i] for i, p in enumerate(patterns)]
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=ENGINE_DTYPE,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=48, enable_prefix_cache=True),
            scheduler=SchedulerConfig(max_num_seqs=3, speculative="ngram"),
        )
    )
    params = SamplingParams(max_new_tokens=32, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompt_token_ids=prompts, params=params)
    stats = engine.stats()
    assert stats.num_draft_tokens > stats.num_accepted_draft_tokens > 0  # some drafts kept, some rolled back
    assert engine.block_manager.window == TINY_WINDOW and engine.block_manager.num_used_blocks == 0
    assert_greedy_matches_reference(model_dir, prompts, outputs)

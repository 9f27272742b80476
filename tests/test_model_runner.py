"""The model runner against transformers `generate()`: greedy ids equal token for token.

Sequences, chunks and block tables are built by hand here (no scheduler), so each test pins one runner
behaviour: batched mixed-length prefill, chunked prefill mixed with decodes, shuffled block tables,
prefix-cache-style context, copy-on-write block copies.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenwire.engine.config import CacheConfig, EngineConfig
from tokenwire.engine.models.linear import Linear
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import ScheduledChunk, Sequence
from tokenwire.engine.worker.device import choose_device, choose_dtype, choose_kv_cache_dtype, cpu_auto_dtype
from tokenwire.engine.worker.model_runner import ModelRunner
from transformers import (
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.reference import ENGINE_DTYPE, EXACT, TORCH_DTYPE, assert_greedy_matches_reference

PROMPT_LENGTHS = (1, 5, 17, 40)
NEW_TOKENS = 8
BLOCK_SIZE = 4
NUM_BLOCKS = 256


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_dir(request, tiny_llama_dir, tiny_gpt2_dir) -> str:
    return tiny_llama_dir if request.param == "llama" else tiny_gpt2_dir


@pytest.fixture(scope="module")
def runner(model_dir) -> ModelRunner:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS)
    return ModelRunner(EngineConfig(model=model_dir, dtype=ENGINE_DTYPE, cache=cache))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in PROMPT_LENGTHS]


def make_seqs(prompts: list[list[int]], tables: list[list[int]]) -> list[Sequence]:
    seqs = [Sequence(f"r{i}", list(p), SamplingParams(temperature=0)) for i, p in enumerate(prompts)]
    for seq, table in zip(seqs, tables):
        seq.block_table = table
    return seqs


def contiguous_tables(prompts: list[list[int]], new_tokens: int, first: int = 0) -> list[list[int]]:
    tables, nxt = [], first
    for p in prompts:
        n = -(-(len(p) + new_tokens) // BLOCK_SIZE)
        tables.append(list(range(nxt, nxt + n)))
        nxt += n
    return tables


def run_greedy(runner: ModelRunner, seqs: list[Sequence], new_tokens: int, budget: int | None = None) -> None:
    """A toy scheduler: decodes first, then prefill chunks under `budget` tokens per step (None: whole)."""
    while any(len(s.output_token_ids) < new_tokens for s in seqs):
        chunks, room = [], budget or 10**9
        for seq in seqs:  # decodes
            if (
                seq.num_computed_tokens == seq.num_tokens - 1
                and seq.output_token_ids
                and len(seq.output_token_ids) < new_tokens
            ):
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1, True))
                room -= 1
        for seq in seqs:  # prefill chunks
            left = seq.num_prompt_tokens - seq.num_computed_tokens
            if left > 0 and room > 0:
                n = min(left, room)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n, n == left))
                room -= n
        random.Random(len(chunks)).shuffle(chunks)  # the runner must not depend on chunk order
        tokens = runner.execute(chunks).argmax(-1).tolist()
        for chunk in chunks:
            chunk.seq.num_computed_tokens = chunk.end
        for chunk, token in zip([c for c in chunks if c.sample], tokens):
            chunk.seq.output_token_ids.append(token)


def test_batched_mixed_lengths_match_hf(runner, model_dir, prompts):
    seqs = make_seqs(prompts, contiguous_tables(prompts, NEW_TOKENS))
    run_greedy(runner, seqs, NEW_TOKENS)
    assert_greedy_matches_reference(model_dir, prompts, [s.output_token_ids for s in seqs])


def test_chunked_prefill_mixed_with_decodes_matches_hf(runner, model_dir, prompts):
    seqs = make_seqs(prompts, contiguous_tables(prompts, NEW_TOKENS))
    run_greedy(runner, seqs, NEW_TOKENS, budget=7)  # 40-token prompt -> many chunks, mid-block starts
    assert_greedy_matches_reference(model_dir, prompts, [s.output_token_ids for s in seqs])


def test_shuffled_block_tables_match_hf(runner, model_dir, prompts):
    needed = [-(-(len(p) + NEW_TOKENS) // BLOCK_SIZE) for p in prompts]
    pool = random.Random(3).sample(range(NUM_BLOCKS), sum(needed))
    tables, at = [], 0
    for n in needed:
        tables.append(pool[at : at + n])
        at += n
    seqs = make_seqs(prompts, tables)
    run_greedy(runner, seqs, NEW_TOKENS, budget=11)
    assert_greedy_matches_reference(model_dir, prompts, [s.output_token_ids for s in seqs])


def test_only_sampling_chunks_return_logits(runner, prompts):
    seqs = make_seqs(prompts[2:], contiguous_tables(prompts[2:], 0))
    chunks = [ScheduledChunk(seqs[0], 0, 17, True), ScheduledChunk(seqs[1], 0, 20, False)]
    logits = runner.execute(chunks)
    assert logits.shape == (1, runner.vocab_size) and logits.dtype == torch.float32
    assert runner.execute([]).shape == (0, runner.vocab_size)


def test_cached_context_and_copied_blocks(runner, prompts):
    """A prefix served from copied blocks gives the same logits as computing it."""
    prompt = prompts[3]  # 40 tokens = 10 blocks
    (table,) = contiguous_tables([prompt], 0, first=100)
    (original,) = make_seqs([prompt], [table])
    reference = runner.execute([ScheduledChunk(original, 0, 40, True)])
    copies = list(range(150, 160))
    runner.copy_blocks([(src, dst) for src, dst in zip(table, copies)][:6])  # first 24 tokens
    (reuser,) = make_seqs([prompt], [copies])
    # Blocks 0-5 come from the copy; positions 24-39 are computed on top of them.
    # bf16: a chunk computed in another shape (prefill vs decode kernel) rounds differently.
    tol = dict(rtol=1e-4, atol=1e-4) if EXACT else dict(rtol=0.05, atol=0.15)
    logits = runner.execute([ScheduledChunk(reuser, 24, 16, True)])
    torch.testing.assert_close(logits, reference, **tol)
    # And a decode-style single token on top of the copied context.
    logits = runner.execute([ScheduledChunk(reuser, 39, 1, True)])
    torch.testing.assert_close(logits, reference, **tol)


def test_runner_properties(runner, model_dir):
    assert runner.eos_token_ids == {2}
    assert runner.max_model_len == 1024
    assert runner.vocab_size == 49152
    assert runner.num_blocks == NUM_BLOCKS and runner.block_size == BLOCK_SIZE
    assert runner.dtype == TORCH_DTYPE and runner.device.type == "cpu"
    assert runner.architecture in ("LlamaForCausalLM", "GPT2LMHeadModel")


def test_num_blocks_from_memory_budget(tiny_llama_dir):
    cache = CacheConfig(block_size=16, kv_cache_memory_gb=0.001)
    runner = ModelRunner(EngineConfig(model=tiny_llama_dir, dtype="float32", cache=cache))
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # K+V, 2 layers, 16 tokens, 2 kv heads, head_dim 16, fp32
    assert runner.num_blocks == int(0.001 * 2**30) // per_block
    assert runner.kv_cache.k.shape == (2, runner.num_blocks, 16, 2, 16)


def test_bad_chunk_is_refused(runner, prompts):
    (seq,) = make_seqs([prompts[1]], [[0]])  # 5 tokens, one 4-token block
    with pytest.raises(ValueError, match="blocks cannot hold"):
        runner.execute([ScheduledChunk(seq, 0, 5, True)])


def test_unsupported_architecture(tmp_path):
    """`--model-impl native` refuses what tokenwire has no forward for (auto takes the fallback:
    test_hf_fallback.py)."""
    config = {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="for model_impl 'native'; supported: LlamaForCausalLM"):
        ModelRunner(EngineConfig(model=str(tmp_path), dtype="float32", model_impl="native"))


def test_max_model_len_beyond_model_is_refused(tiny_gpt2_dir):
    with pytest.raises(ValueError, match="max_model_len"):
        ModelRunner(EngineConfig(model=tiny_gpt2_dir, dtype="float32", max_model_len=4096))


def test_smollm2_real_prompts_match_hf(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    runner = ModelRunner(EngineConfig(model=smollm2_dir, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=16)))
    tables, nxt = [], 0
    for p in prompts:
        n = -(-(len(p) + 16) // runner.block_size)
        tables.append(list(range(nxt, nxt + n))[::-1])
        nxt += n
    seqs = make_seqs(prompts, tables)
    run_greedy(runner, seqs, 16)
    assert_greedy_matches_reference(smollm2_dir, prompts, [s.output_token_ids for s in seqs])


def test_decode_groups_match_single_decodes(runner):
    """Many decodes of spread-out lengths split into length groups; each row equals decoding it alone."""
    rng = random.Random(11)
    lengths = [1, 3, 9, 14, 22, 30, 41, 55, 63, 80, 99, 120]
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in lengths]
    seqs = make_seqs(prompts, contiguous_tables(prompts, 1))
    for seq in seqs:  # prefill alone, then all decodes of the last prompt token's successor together
        seq.output_token_ids.append(int(runner.execute([ScheduledChunk(seq, 0, seq.num_tokens, True)]).argmax()))
    chunks = [ScheduledChunk(s, s.num_tokens - 1, 1, True) for s in seqs]
    step = runner._prepare(chunks)
    # Torch ops split decodes into length groups; the native kernel reads each length in one group.
    assert len(step.attention.decodes) == 1 if runner.native is not None else len(step.attention.decodes) > 1
    batched = runner.execute(chunks[::-1])
    alone = torch.cat([runner.execute([c]) for c in chunks[::-1]])
    # bf16: a different batch shape rounds differently; logits of a few units then differ by ~0.1.
    tol = dict(rtol=1e-4, atol=1e-4) if EXACT else dict(rtol=0.05, atol=0.15)
    torch.testing.assert_close(batched, alone, **tol)


_VARIANTS = {  # tiny Llama-family relatives: what each adds over Llama
    "mistral-sliding-window": (MistralForCausalLM, MistralConfig, dict(sliding_window=6)),
    "qwen2-qkv-bias": (Qwen2ForCausalLM, Qwen2Config, dict()),
    "qwen3-qk-norm-head-dim": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=32, attention_bias=True)),
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_llama_family_variants_match_hf(variant, tmp_path):
    model_cls, config_cls, extra = _VARIANTS[variant]
    config = config_cls(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        eos_token_id=2,
        **extra,
    )
    torch.manual_seed(0)
    model_cls(config).eval().save_pretrained(tmp_path)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 1024) for _ in range(n)] for n in (3, 11, 29)]
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=64)
    runner = ModelRunner(EngineConfig(model=str(tmp_path), dtype=ENGINE_DTYPE, cache=cache))
    assert runner.architecture == model_cls.__name__
    seqs = make_seqs(prompts, contiguous_tables(prompts, NEW_TOKENS))
    run_greedy(runner, seqs, NEW_TOKENS, budget=9)
    assert_greedy_matches_reference(str(tmp_path), prompts, [s.output_token_ids for s in seqs])


@pytest.mark.parametrize(
    "capability, flags, expected",
    [
        ("AVX512", {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Xeon with AMX
        ("AVX512", {"avx512f", "avx512_bf16"}, torch.bfloat16),  # EPYC Zen 4, Xeon Cooper Lake
        ("AVX512", {"avx512f", "avx512_vnni"}, torch.float32),  # Xeon Ice Lake: no bf16
        ("AVX2", {"avx2", "avx512_bf16"}, torch.float32),  # torch's AVX2 kernels
        ("DEFAULT", set(), torch.float32),
    ],
)
def test_cpu_auto_dtype_follows_the_cpu_features(capability, flags, expected):
    dtype, why = cpu_auto_dtype(capability, flags)
    assert dtype == expected and capability in why


def test_dtype_and_device_choice():
    cpu = torch.device("cpu")
    assert choose_device("auto") == (torch.device("cuda") if torch.cuda.is_available() else cpu)
    assert choose_dtype("float32", cpu) == torch.float32
    assert choose_dtype("bfloat16", cpu) == torch.bfloat16
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        assert choose_dtype("auto", cpu) == torch.float32  # bf16 is emulated, 4-5x slower, on AVX2
    assert len({choose_dtype("auto", cpu) for _ in range(5)}) == 1  # a rule, not a timing race
    with pytest.raises(ValueError, match="dtype"):
        choose_dtype("fp8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            choose_device("cuda")


def test_kv_cache_dtype_choice(tiny_llama_dir):
    assert choose_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert choose_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    assert choose_kv_cache_dtype("float16", torch.float32) == torch.float16
    assert choose_kv_cache_dtype("bfloat16", torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype: expected auto"):
        choose_kv_cache_dtype("fp8", torch.float32)
    with pytest.raises(ValueError, match="kv_cache_dtype: float32 under a bfloat16 model"):
        choose_kv_cache_dtype("float32", torch.bfloat16)
    with pytest.raises(ValueError, match="kv_cache_dtype: float16 under a bfloat16 model"):
        choose_kv_cache_dtype("float16", torch.bfloat16)
    # The budget buys twice the blocks with half the bytes per block.
    budget = dict(block_size=16, kv_cache_memory_gb=0.001)
    wide = ModelRunner(EngineConfig(model=tiny_llama_dir, dtype="float32", cache=CacheConfig(**budget)))
    narrow = ModelRunner(
        EngineConfig(model=tiny_llama_dir, dtype="float32", cache=CacheConfig(**budget, kv_cache_dtype="bfloat16"))
    )
    assert narrow.kv_cache.k.dtype == torch.bfloat16 and narrow.num_blocks == 2 * wide.num_blocks


@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(bias):
    torch.manual_seed(0)
    weight, x, residual = torch.randn(48, 32), torch.randn(5, 32), torch.randn(5, 48)
    b = torch.randn(48) if bias else None
    linear = Linear(weight, b)
    expected = torch.nn.functional.linear(x, weight, b)
    torch.testing.assert_close(linear(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(linear.add(x, residual.clone()), residual + expected, rtol=1e-4, atol=1e-4)


def test_gemm_rows_are_a_bounded_set_of_shapes():
    from tokenwire.engine.models.linear import gemm_rows

    rows = [gemm_rows(m) for m in range(1, 1025)]
    assert rows[:16] == list(range(1, 17)) and len(set(rows)) <= 48
    assert all(0 <= r - m < max(16, m / 8) for m, r in zip(range(1, 1025), rows))  # under 16 rows or 1/8


@pytest.mark.parametrize("m", [5, 17, 200])
def test_a_padded_gemm_gives_the_rows_it_was_asked_for(m):
    from tokenwire.engine.models.linear import Linear

    torch.manual_seed(0)
    weight, bias, x, residual = torch.randn(24, 40), torch.randn(24), torch.randn(m, 40), torch.randn(m, 24)
    linear = Linear(weight, bias)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    want = residual + torch.nn.functional.linear(x, weight, bias)
    torch.testing.assert_close(linear.add(x, residual.clone()), want, rtol=1e-5, atol=1e-5)

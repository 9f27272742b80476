"""Quantized weights: GGUF blocks against gguf's own reader, the native GEMV against de-quantize-then-
matmul, a GGUF model against transformers on the same file, and a GGUF file through both services."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from tokenwire.client import Client
from tokenwire.engine.config import CacheConfig, EngineConfig
from tokenwire.engine.models import kernels, quantized
from tokenwire.engine.models.quantized import QuantizedWeight
from tokenwire.engine.worker.model_runner import ModelRunner
from tokenwire.serving.model_resolver import gguf_file
from tokenwire.tokenizer.config import TokenizerServiceConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.reference import BF16_LOGPROB_TOL, ENGINE_DTYPE, TORCH_DTYPE, hf_model
from tests.servers import EngineThread, TokenizerThread
from tests.test_model_runner import BLOCK_SIZE, contiguous_tables, make_seqs, run_greedy
from tests.tiny_models import build_tiny_gguf

N, K = 48, 512  # K a multiple of the K-quants' 256


def _random_k_blocks(kind: str, rng) -> np.ndarray:
    """Random Q4_K / Q6_K bytes with sane fp16 scales (gguf-py cannot quantize to these types)."""
    size = {"Q4_K": 144, "Q6_K": 210}[kind]
    raw = rng.integers(0, 256, size=(N, K // 256, size), dtype=np.uint8)
    scales = (rng.random((N, K // 256, 2)) * 0.01).astype(np.float16).view(np.uint8)
    if kind == "Q4_K":
        raw[..., 0:4] = scales.reshape(N, K // 256, 4)
    else:
        raw[..., 208:210] = scales[..., 0:2].reshape(N, K // 256, 2)
    return raw.reshape(N, -1)


def _gguf_tensor(kind: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind in ("Q4_K", "Q6_K"):
        return _random_k_blocks(kind, rng)
    weight = (rng.standard_normal((N, K)) * 0.1).astype(np.float32)
    return quants.quantize(weight, GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", quantized.SUPPORTED_GGUF_TYPES)
def test_blocks_dequantize_to_the_weights_gguf_reads(kind):
    data = _gguf_tensor(kind)
    expected = quants.dequantize(data, GGMLQuantizationType[kind])
    got = quantized.from_gguf(data, kind, (N, K)).dequantize().numpy()
    if kind.endswith("_K"):  # sub-block scale and min rounded to fp16: 2^-11 of the terms' size at most
        np.testing.assert_allclose(got, expected, rtol=2**-10, atol=2**-10 * float(np.abs(expected).max()))
    else:
        np.testing.assert_array_equal(got, expected)


def test_an_unsupported_type_is_refused_by_name():
    with pytest.raises(ValueError, match="Q5_0 is not kept in blocks; supported: Q4_0, Q4_1"):
        quantized.from_gguf(np.zeros((N, K // 32 * 22), np.uint8), "Q5_0", (N, K))


def test_int8_blocks_stay_within_half_a_step():
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    blocks = quantized.quantize_int8(weight)
    step = weight.view(N, K // 32, 32).abs().amax(-1, keepdim=True) / 127
    error = (blocks.dequantize().view(N, K // 32, 32) - weight.view(N, K // 32, 32)).abs()
    # the step is stored in fp16, so it may sit 2^-11 above the exact one
    assert bool((error <= step * 0.5 * (1 + 2**-10)).all())


@pytest.mark.parametrize("kind, tile_bytes", [("Q4_1", 320), ("Q8_0", 544)])
def test_tiles_hold_the_same_weights(kind, tile_bytes):
    weight = quantized.from_gguf(_gguf_tensor(kind), kind, (N, K))
    tiles = QuantizedWeight(quantized.tile(weight.blocks), kind)
    assert tiles.blocks.shape == (N // 16, K // 32, tile_bytes) and tiles.out_features == N
    untile = quantized.untile_q4 if kind == "Q4_1" else quantized.untile_q8
    assert torch.equal(untile(tiles.blocks), weight.blocks)
    assert torch.equal(tiles.dequantize(), weight.dequantize())
    assert quantized.tile(tiles.blocks) is None  # tiles once


# the q4 and q8 (G 32) layouts, row by row and in tiles, and q8 (G 16); tiles run on the portable loop
# without AVX512-VNNI
@pytest.mark.parametrize("kind", ["Q4_1", "Q4_1 tiles", "Q8_0", "Q8_0 tiles", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_native_gemv_on_blocks_matches_dequantize_then_matmul(kind, dtype, rows):
    native = kernels.native()
    if native is None:
        pytest.skip("no compiler here: the fallback is all there is")
    gguf_type = kind.split()[0]
    weight = quantized.from_gguf(_gguf_tensor(gguf_type), gguf_type, (N, K))
    if kind.endswith("tiles"):
        weight = QuantizedWeight(quantized.tile(weight.blocks), gguf_type)
    # Seeded: both sides round x to int8 in two levels, and an unseeded x can land on a .5 tie that
    # the two round apart (one level of one element: a 1e-5 relative gap, a flaky failure).
    generator = torch.Generator().manual_seed(rows * 1000 + K)
    x = torch.randn(rows, K, generator=generator).to(dtype)
    bias, residual = torch.randn(N, generator=generator).to(dtype), torch.randn(rows, N, generator=generator).to(dtype)
    for b, r in ((None, None), (bias, residual)):
        got = native.gemv(x, weight.blocks, b, r)
        expected = kernels.gemv(x, weight.blocks, b, r)
        torch.testing.assert_close(
            got.float(), expected.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-3
        )


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> str:
    return str(build_tiny_gguf(gguf_file("smollm2-135m"), tmp_path_factory.mktemp("gguf") / "tiny-q4_1.gguf"))


def _runner(model: str, quantization: str, dense_copy: bool = True) -> ModelRunner:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=256)
    return ModelRunner(
        EngineConfig(
            model=model, dtype=ENGINE_DTYPE, quantization=quantization, quantized_dense_copy=dense_copy, cache=cache
        )
    )


def _greedy(runner: ModelRunner, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Prefill in one batch (the many-row GEMMs), decodes of 3 rows (the few-row GEMV on the blocks)."""
    seqs = make_seqs(prompts, contiguous_tables(prompts, new_tokens))
    run_greedy(runner, seqs, new_tokens)
    return [s.output_token_ids for s in seqs]


PROMPTS = [[1, 5, 9, 200, 17], list(range(100, 140)), [42]]


def _reference_logprobs_gap(model, prompt: list[int], output: list[int]) -> float:
    ids = torch.tensor([prompt + output[:-1]])
    with torch.no_grad():
        logprobs = model(ids).logits[0, len(prompt) - 1 :].float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor(output)[:, None])[:, 0]
    return float((logprobs.max(-1).values - chosen).max())


def test_a_gguf_model_runs_on_its_blocks_and_agrees_with_transformers_on_the_file(tiny_gguf):
    runner = _runner(tiny_gguf, "auto")
    assert runner.quantization.startswith("gguf (") and "Q4_1" in runner.quantization
    dense = _runner(tiny_gguf, "none")
    # a decode step reads at most Q8_0's 34 bytes per 32 weights, against the dense dtype's element size
    dense_bytes_per_weight = torch.empty((), dtype=dense.dtype).element_size()
    assert runner.weight_bytes()["per_token"] <= dense.weight_bytes()["per_token"] * (34 / 32) / dense_bytes_per_weight
    folder, name = tiny_gguf.rsplit("/", 1)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=TORCH_DTYPE).eval()
    for prompt, output in zip(PROMPTS, _greedy(runner, PROMPTS, 8)):
        # The blocks hold the file's weights exactly, but decode steps meet them with int8 activations.
        assert _reference_logprobs_gap(reference, prompt, output) <= BF16_LOGPROB_TOL


def test_blocks_alone_hold_less_memory_and_keep_the_accuracy_rule(tiny_gguf):
    """`quantized_dense_copy=False`: no linear keeps a dense copy, prefill runs the GEMV in row groups."""
    if kernels.native() is None:
        pytest.skip("no compiler here: without the native GEMV the dense copy is all there is")
    both, alone = _runner(tiny_gguf, "auto"), _runner(tiny_gguf, "auto", dense_copy=False)
    linears = [lin for layer in alone.model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    assert all(lin.packed is None and lin.weight is None and lin.quantized is not None for lin in linears)
    assert alone.weight_bytes()["per_token"] == both.weight_bytes()["per_token"]
    assert alone.weight_bytes()["held"] < both.weight_bytes()["held"] - sum(lin.quantized.nbytes for lin in linears)
    folder, name = tiny_gguf.rsplit("/", 1)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=TORCH_DTYPE).eval()
    for prompt, output in zip(PROMPTS, _greedy(alone, PROMPTS, 8)):
        assert _reference_logprobs_gap(reference, prompt, output) <= BF16_LOGPROB_TOL


def test_int8_at_load_stays_within_the_accuracy_rule(tiny_llama_dir):
    runner = _runner(tiny_llama_dir, "int8")
    assert runner.quantization.startswith("int8 (")
    reference = hf_model(tiny_llama_dir)
    for prompt, output in zip(PROMPTS, _greedy(runner, PROMPTS, 8)):
        assert _reference_logprobs_gap(reference, prompt, output) <= BF16_LOGPROB_TOL


def test_gguf_quantization_needs_a_gguf_model(tiny_llama_dir):
    with pytest.raises(ValueError, match="quantization: 'gguf' needs a .gguf model"):
        _runner(tiny_llama_dir, "gguf")
    with pytest.raises(ValueError, match="quantization: one of auto, gguf, int8, none"):
        _runner(tiny_llama_dir, "int4")


def test_a_gguf_file_through_both_services(tiny_gguf):
    engine = EngineThread(EngineConfig(model=tiny_gguf, dtype=ENGINE_DTYPE, cache=CacheConfig(num_blocks=64)))
    tokenizer = TokenizerThread(TokenizerServiceConfig(model=tiny_gguf, port=0))
    try:
        with Client(tokenizer=tokenizer.address, engine=engine.address, timeout=60) as client:
            ids = client.encode("The capital of France is")
            assert (
                ids
                == AutoTokenizer.from_pretrained(tiny_gguf.rsplit("/", 1)[0], gguf_file=tiny_gguf.rsplit("/", 1)[1])(
                    "The capital of France is"
                ).input_ids
            )
            chunks = list(client.generate("The capital of France is", max_new_tokens=6, temperature=0.0))
            assert sum(len(c.token_ids) for c in chunks) == 6 and chunks[-1].finished
            # the served engine decodes on the file's blocks, not on a dense copy of the converted folder
            assert client.model_info().config.quantization.startswith("gguf (")
    finally:
        engine.close()
        tokenizer.close()

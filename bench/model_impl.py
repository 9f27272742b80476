"""The transformers fallback against the native forward on one model, in one run: single-stream decode.

    python -m tokenwire.bench.model_impl [--model smollm2-135m] [--dtype auto] [--quantization none]
        [--new-tokens 32] [--rounds 9]

Both runners (`--model-impl native` and `transformers`) are loaded side by side. Each round prefills one
32-token prompt and decodes `--new-tokens` greedy tokens on each in turn, so the machine's drift hits both
alike; the figures are the median and the fastest round's ms per decoded token (prefill excluded), and the
ratios of each (on a busy machine the fastest round is the least disturbed). Both run the same dense
weights (`--quantization none`: the fallback runs no quantized blocks), straight into the model runner (no
scheduler, no sampler: argmax of the logits), so the difference is the forwards'. Also reports whether
both decoded the same ids (in float32 they must).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from tokenwire.engine.config import CacheConfig, EngineConfig
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import ScheduledChunk, Sequence
from tokenwire.engine.worker.device import dtype_name
from tokenwire.engine.worker.model_runner import ModelRunner

PROMPT_LEN = 32


def decode(runner: ModelRunner, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """ms per decoded token after the prefill of `prompt`, and the greedy ids."""
    seq = Sequence("bench", list(prompt), SamplingParams(temperature=0.0))
    seq.block_table = list(range(-(-(len(prompt) + new_tokens) // runner.block_size)))
    seq.output_token_ids.append(int(runner.execute([ScheduledChunk(seq, 0, len(prompt), True)]).argmax()))
    seq.num_computed_tokens = len(prompt)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = runner.execute([ScheduledChunk(seq, seq.num_tokens - 1, 1, True)])
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(int(logits.argmax()))
    return (time.perf_counter() - start) * 1000 / (new_tokens - 1), seq.output_token_ids


def measure(model: str, dtype: str, quantization: str, new_tokens: int, rounds: int, seed: int = 0) -> dict:
    cache = CacheConfig(num_blocks=-(-(PROMPT_LEN + new_tokens) // CacheConfig.block_size))
    runners = {
        impl: ModelRunner(
            EngineConfig(model=model, dtype=dtype, quantization=quantization, model_impl=impl, cache=cache)
        )
        for impl in ("native", "transformers")
    }
    vocab = runners["native"].vocab_size
    prompt = [random.Random(seed).randrange(3, vocab) for _ in range(PROMPT_LEN)]
    for runner in runners.values():  # warm-up: one-time costs (kernel dispatch, allocations) off the clock
        decode(runner, prompt, 4)
    ms: dict[str, list[float]] = {impl: [] for impl in runners}
    ids: dict[str, list[int]] = {}
    for _ in range(rounds):
        for impl, runner in runners.items():
            took, ids[impl] = decode(runner, prompt, new_tokens)
            ms[impl].append(took)
    median = {impl: statistics.median(v) for impl, v in ms.items()}
    fastest = {impl: min(v) for impl, v in ms.items()}
    native = runners["native"]
    return {
        "model": model,
        "architecture": native.architecture,
        "dtype": dtype_name(native.dtype),
        "quantization": native.quantization,
        "device": str(native.device),
        "native_kernels": native.native is not None,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "ms_per_token": ms,
        "median_ms_per_token": median,
        "min_ms_per_token": fastest,
        "fallback_over_native": median["transformers"] / median["native"],
        "fallback_over_native_fastest": fastest["transformers"] / fastest["native"],
        "same_ids": ids["native"] == ids["transformers"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=EngineConfig.model)
    ap.add_argument("--dtype", default=EngineConfig.dtype)
    ap.add_argument("--quantization", default="none", help="both runners' (engine flag); none: dense weights")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    result = measure(args.model, args.dtype, args.quantization, args.new_tokens, args.rounds)
    med, low = result["median_ms_per_token"], result["min_ms_per_token"]
    print(
        f"{result['architecture']} {result['dtype']} on {result['device']}: single-stream decode, median "
        f"(fastest round): native {med['native']:.2f} ({low['native']:.2f}) ms/token, transformers fallback "
        f"{med['transformers']:.2f} ({low['transformers']:.2f}) ms/token; fallback/native "
        f"{result['fallback_over_native']:.2f}x ({result['fallback_over_native_fastest']:.2f}x), "
        f"same ids: {result['same_ids']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

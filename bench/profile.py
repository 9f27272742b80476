"""Workload P1 driven straight into the model runner: its throughput and where a step's time goes.

    python -m tokenwire.bench.profile [--model smollm2-135m] [--dtype auto] [--no-ceiling]

32 prompts of 32-255 random ids (P1's lengths, as in ../shared/tools/p1_ceiling.py), prefilled in
512-token steps packed across prompts the way the scheduler chunks them, then 63 decode steps of batch
32, greedy, contiguous block tables. Prints completion tok/s, a breakdown of a decode step (batch 32 and
batch 1) and of a prefill step
(linear layers, attention, other ops, Python) from torch.profiler, the sampler's time, and the P1 ceiling
measured with torch's F.linear and with the runner's own GEMMs. No scheduler, no engine loop: the
difference to `tokenwire bench --workload P1` is what those cost.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from functools import partial

import torch
from tokenwire.bench.baselines import measure_ceiling, time_linear
from tokenwire.bench.workloads import p1_prompt_lengths
from tokenwire.engine.config import CacheConfig, EngineConfig
from tokenwire.engine.models.linear import Linear
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.sequence import ScheduledChunk, Sequence
from tokenwire.engine.worker.model_runner import ModelRunner
from tokenwire.serving.model_resolver import resolve_model
from torch.profiler import ProfilerActivity, profile

_CATEGORIES = {  # aten op -> bucket of the breakdown
    "linear": (
        "aten::addmm",
        "aten::addmm_",
        "aten::mm",
        "aten::linear",
        "aten::matmul",
        "mkldnn::_linear_pointwise",
        "mkldnn::_linear_pointwise.binary",
        "tokenwire::gemv",
    ),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::scaled_dot_product_attention",
        "aten::_scaled_dot_product_flash_attention",
        "aten::index_select",
        "aten::index_copy_",
        "aten::bitwise_and",
        "aten::lt",
        "aten::le",
        "aten::gt",
        "tokenwire::paged_decode",
    ),
}


def _bucket(event) -> str:
    """The bucket of the nearest op, this one or one that called it, that has one: what a linear or an
    attention op calls (the output's aten::empty, an index conversion) is part of its cost."""
    while event is not None:
        bucket = next((b for b, ops in _CATEGORIES.items() if event.name in ops), None)
        if bucket is not None:
            return bucket
        event = event.cpu_parent
    return "other ops"


def make_sequences(n: int, block_size: int, vocab: int) -> list[Sequence]:
    rng = random.Random(0)
    seqs, next_block = [], 0
    for i, length in enumerate(p1_prompt_lengths(n)):
        seq = Sequence(f"p{i}", [rng.randrange(vocab) for _ in range(length)], SamplingParams(temperature=0))
        blocks = -(-(length + 64) // block_size)
        seq.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        seqs.append(seq)
    return seqs


def prefill_steps(seqs: list[Sequence], budget: int) -> list[list[ScheduledChunk]]:
    steps, current, room = [], [], budget
    for seq in seqs:
        start = 0
        while start < seq.num_tokens:
            n = min(room, seq.num_tokens - start)
            current.append(ScheduledChunk(seq, start, n, start + n == seq.num_tokens))
            start, room = start + n, room - n
            if room == 0:
                steps.append(current)
                current, room = [], budget
    return steps + ([current] if current else [])


def run_step(runner: ModelRunner, sampler, chunks: list[ScheduledChunk]) -> None:
    logits = runner.execute(chunks)
    sampled = [c.seq for c in chunks if c.sample]
    for seq, token in zip(sampled, sampler.sample(logits, sampled).token_ids):
        seq.output_token_ids.append(token)


def decode_chunks(seqs: list[Sequence]) -> list[ScheduledChunk]:
    return [ScheduledChunk(s, s.num_tokens - 1, 1, True) for s in seqs]


def run_p1(runner: ModelRunner, sampler, new_tokens: int) -> tuple[float, float, list[Sequence]]:
    seqs = make_sequences(32, runner.block_size, runner.vocab_size)
    start = time.perf_counter()
    for chunks in prefill_steps(seqs, 512):
        run_step(runner, sampler, chunks)
    prefill_s = time.perf_counter() - start
    for _ in range(new_tokens - 1):
        run_step(runner, sampler, decode_chunks(seqs))
    return prefill_s, time.perf_counter() - start, seqs


def breakdown(label: str, runner: ModelRunner, sampler, make_chunks, reps: int = 5) -> None:
    """Profile `reps` steps of `make_chunks()`; bucket each op's self time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time.perf_counter()
        for _ in range(reps):
            chunks = make_chunks()
            sampler.sample(runner.execute(chunks), [c.seq for c in chunks if c.sample])
        wall = (time.perf_counter() - wall) / reps
    buckets: dict[str, float] = defaultdict(float)
    for event in prof.events():
        buckets[_bucket(event)] += event.self_cpu_time_total / 1e6 / reps
    print(f"{label}: {wall * 1e3:.1f} ms per step (profiled)")
    ops = sum(buckets.values())
    for name, seconds in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10s} {seconds * 1e3:7.1f} ms  {seconds / wall:5.1%}")
    print(f"  {'python':10s} {(wall - ops) * 1e3:7.1f} ms  {(wall - ops) / wall:5.1%}  (wall minus op time)")
    print(f"  outside the linear layers: {1 - buckets['linear'] / wall:.1%} of the step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def time_decode(runner: ModelRunner, sampler, seqs: list[Sequence], reps: int = 5) -> None:
    """Unprofiled: one decode step's forward and sampling."""
    start = time.perf_counter()
    for _ in range(reps):
        logits = runner.execute(decode_chunks(seqs))
    forward = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):
        sampler.sample(logits, seqs)
    sample = (time.perf_counter() - start) / reps
    print(f"decode step, batch {len(seqs)} (unprofiled): forward {forward * 1e3:.1f} ms, sampler {sample * 1e3:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenwire.bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", help="bfloat16/float16 under a float32 model (engine flag)")
    ap.add_argument(
        "--few-row-gemv",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GEMMs of 1-4 rows on a plain weight copy (engine flag)",
    )
    ap.add_argument("--quantization", default="auto", help="linear weights: auto, gguf, int8, none (engine flag)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the P1 ceiling (linear layers alone) in this process",
    )
    ap.add_argument("--no-breakdown", action="store_true", help="throughput only, no profiled steps")
    args = ap.parse_args(argv)
    model_dir = resolve_model(args.model)
    runner = ModelRunner(
        EngineConfig(
            model=args.model,  # a name or .gguf path: the runner resolves it (and serves its blocks)
            dtype=args.dtype,
            few_row_gemv=args.few_row_gemv,
            quantization=args.quantization,
            cache=CacheConfig(kv_cache_dtype=args.kv_cache_dtype),
        )
    )
    sampler = runner.sampler
    print(
        f"{runner.architecture} {runner.dtype} (KV cache {runner.kv_dtype}) on {runner.device}, "
        f"{torch.get_num_threads()} threads, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    run_p1(runner, sampler, 4)  # warm-up: first calls allocate and pick kernels
    prefill_s, total_s, seqs = run_p1(runner, sampler, args.new_tokens)
    completion = len(seqs) * args.new_tokens
    print(
        f"P1: {sum(s.num_prompt_tokens for s in seqs)} prompt tokens, {completion} completion tokens in "
        f"{total_s:.2f} s (prefill {prefill_s:.2f} s) -> {completion / total_s:.1f} completion tok/s"
    )
    if not args.no_breakdown:
        for seq in seqs:  # decode from mid-P1 contexts; each table has room for 64 new tokens
            del seq.output_token_ids[32:]
        for batch in (seqs, seqs[:1]):  # P1's batch, and one stream (naive mode's step)
            time_decode(runner, sampler, batch)
            breakdown(f"decode step, batch {len(batch)}", runner, sampler, lambda b=batch: decode_chunks(b))
        first_prefill = prefill_steps(make_sequences(32, runner.block_size, runner.vocab_size), 512)[0]
        breakdown("prefill step, 512 tokens", runner, sampler, lambda: first_prefill, reps=2)
    if args.ceiling and runner.device.type == "cpu":
        report_ceilings(
            model_dir, runner.dtype, completion / total_s, [s.num_prompt_tokens for s in seqs], args.new_tokens
        )
    return 0


def report_ceilings(model_dir: str, dtype: torch.dtype, tok_s: float, prompt_lens: list[int], new_tokens: int) -> None:
    """p1_ceiling.py's figure (F.linear GEMMs), and the same with the runner's own GEMM backend."""
    for name, timer in (("F.linear", time_linear), ("runner Linear", partial(time_linear, layer=Linear))):
        ceiling = measure_ceiling(model_dir, dtype, prompt_lens, new_tokens, time_linear=timer)
        print(
            f"ceiling, linear layers alone with {name}: {ceiling.completion_tok_s:.1f} tok/s "
            f"(prefill {ceiling.prefill_s:.2f} s, decode {ceiling.decode_s:.2f} s) -> runner at "
            f"{tok_s / ceiling.completion_tok_s:.0%}"
        )


if __name__ == "__main__":
    raise SystemExit(main())

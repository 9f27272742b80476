"""The benchmark's flags and modes: `tokenwire-bench --help` is this parser (bench/cli.py runs it)."""

from __future__ import annotations

import argparse

from tokenwire.bench.workloads import STANDARD
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.serving.model_resolver import DEFAULT_MODEL

MODES = ("offline", "naive", "online", "online_etext", "online_ids", "replicas", "hf_static", "hf_batch", "llamacpp")
ONLINE_MODES = ("online", "online_etext", "online_ids")
# Others: offline. copy: one stream at a time, speculation off and on (--spec-compare).
DEFAULT_MODES = {"P1": "offline,hf", "online": "offline,online", "multiprefix": "replicas", "copy": "naive"}
ENGINE_MODES = ("offline", "naive", *ONLINE_MODES)
BASELINES = ("hf_static", "hf_batch", "llamacpp", "offline")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenwire bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="tokenwire bench soak --help: the engine service's memory soak",
    )
    p.add_argument(
        "--mode",
        help=f"comma-separated among {', '.join(MODES)}, hf (= hf_static,hf_batch); "
        f"default per workload: {DEFAULT_MODES}, else offline",
    )
    p.add_argument(
        "--workload",
        choices=[*STANDARD, "custom"],
        help="a standard workload (default P1, or custom when prompts are given)",
    )
    w = p.add_argument_group("prompts (override the workload's defaults)")
    w.add_argument("--prompt", help="one prompt text, sent --num-requests times")
    w.add_argument("--prompts", dest="prompts_file", help="file: one prompt per line, or JSONL with 'prompt'")
    w.add_argument("--input-len", type=int, help="synthetic prompts of this many tokens")
    w.add_argument("--input-len-range", type=int, nargs=2, metavar=("LO", "HI"), help="synthetic lengths, uniform")
    w.add_argument("--shared-prefix-len", type=int, help="tokens of a system prompt every request shares")
    w.add_argument("--num-prefixes", type=int, help="distinct system prompts, taken in turn by the requests")
    w.add_argument("--num-requests", type=int)
    w.add_argument("--max-new-tokens", type=int)
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None)
    w.add_argument("--seed", type=int, default=0, help="seeds prompts, arrivals and sampling")
    s = p.add_argument_group("sampling (defaults: greedy)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    e = p.add_argument_group("engine")
    e.add_argument("--model", default=DEFAULT_MODEL)
    e.add_argument("--device", default=EngineConfig.device)
    e.add_argument("--dtype", default=EngineConfig.dtype, help="auto picks the fast dtype, as the engine")
    e.add_argument("--no-prefix-cache", action="store_true")
    e.add_argument("--max-num-seqs", type=int, default=SchedulerConfig.max_num_seqs)
    e.add_argument("--max-num-batched-tokens", type=int, default=SchedulerConfig.max_num_batched_tokens)
    e.add_argument("--kv-cache-memory-gb", type=float, default=CacheConfig.kv_cache_memory_gb)
    e.add_argument(
        "--kv-cache-dtype",
        default=CacheConfig.kv_cache_dtype,
        help="bfloat16/float16 under a float32 model: half the K/V bytes (not bit-exact)",
    )
    e.add_argument(
        "--few-row-gemv",
        action=argparse.BooleanOptionalAction,
        default=EngineConfig.few_row_gemv,
        help="CPU: GEMMs of 1-4 rows on a plain weight copy (engine flag)",
    )
    e.add_argument(
        "--quantization",
        default=EngineConfig.quantization,
        help="linear weights: auto (a GGUF file's blocks, else dense), gguf, int8, none (engine flag)",
    )
    e.add_argument(
        "--quantized-dense-copy",
        action=argparse.BooleanOptionalAction,
        default=EngineConfig.quantized_dense_copy,
        help="quantized weights: a de-quantized copy for batches and prefill; off: the blocks alone (engine flag)",
    )
    e.add_argument(
        "--model-impl",
        default=EngineConfig.model_impl,
        help="forward: auto (native where known, else transformers), native, transformers (engine flag)",
    )
    e.add_argument(
        "--speculative",
        default=SchedulerConfig.speculative,
        help="ngram: prompt-lookup drafts (engine flag); off",
    )
    e.add_argument("--num-speculative-tokens", type=int, default=SchedulerConfig.num_speculative_tokens)
    e.add_argument(
        "--spec-compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offline/naive with speculation off and ngram, runs interleaved, TPOT ratio and acceptance "
        "(default: on for the copy workload)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--pretok", action="store_true", help="tokenize before the timed region and send ids")
    r.add_argument("--warmup-runs", type=int, default=1)
    r.add_argument("--warmup-max-new-tokens", type=int, default=8, help="warm-up runs generate this many at most")
    r.add_argument("--warmup-max-requests", type=int, default=32, help="warm-up runs send this many at most")
    r.add_argument(
        "--warmup-max-prompt-tokens",
        type=int,
        default=512,
        help="warm-up prompts are cut to this many tokens (text: words)",
    )
    r.add_argument("--repeat-runs", type=int, default=1)
    r.add_argument("--hf-batch-size", type=int, default=0, help="generate() static batch size (0: all)")
    r.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the physical ceiling (linear layers alone) in this run (default: on for P1)",
    )
    o = p.add_argument_group("online")
    o.add_argument("--request-rate", type=float, help="Poisson arrivals per second (inf: all at once)")
    o.add_argument("--concurrency", type=int, help="at most this many requests in flight")
    o.add_argument("--engine-addr", help="host:port of a running engine service (default: start one)")
    o.add_argument("--tokenizer-addr", help="host:port of a running tokenizer service (default: start one)")
    o.add_argument("--replicas", type=int, default=3, help="replicas mode: engine replicas started here")
    o.add_argument(
        "--endpoint",
        default="grpc",
        help="comma-separated among grpc (the SDK), openai (the gateway through the openai client), "
        "sse (the gateway, raw SSE through httpx); each is one online mode, run in this order",
    )
    o.add_argument(
        "--gateway-url",
        help="http://host:port of a running gateway serving the model as "
        "'bench' (default: start one over the services)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--json", dest="json_out", help="write every figure and the environment here")
    out.add_argument("--plot", help="write latency CDFs and throughput bars to this PNG")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--log-level", default="WARNING")
    return p


def parse_modes(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    expanded = [x for m in names for x in (("hf_static", "hf_batch") if m == "hf" else (m,))]
    bad = [m for m in expanded if m not in MODES]
    if bad or not expanded:
        raise SystemExit(f"--mode: unknown {bad or text!r}; choose from {', '.join(MODES)}, hf")
    return [m for m in MODES if m in expanded]  # canonical order: engine modes before the baselines


def parse_endpoints(text: str) -> tuple[str, ...]:
    from tokenwire.bench.online import ENDPOINTS

    names = tuple(dict.fromkeys(e.strip() for e in text.split(",") if e.strip()))
    bad = [e for e in names if e not in ENDPOINTS]
    if bad or not names:
        raise SystemExit(f"--endpoint: unknown {bad or text!r}; choose from {', '.join(ENDPOINTS)}")
    return names

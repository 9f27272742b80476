"""The `json` workload: P1's shape with one JSON schema per request (drawn from a few), run constrained
and unconstrained on one engine in one invocation, runs interleaved so that both see the same machine.

Reports each mode's throughput (`offline_json` against `offline`) and, per distinct schema, its compile
time cold and cached. The schemas keep every output longer than P1's 64 tokens, so every constrained
token is masked by a live grammar (ignore_eos would otherwise pad finished outputs with free eos).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

from tokenwire.bench import engine as bench_engine
from tokenwire.bench.report import progress_bar
from tokenwire.engine.request.sampling_params import Constraint, SamplingParams

_TEXT = {"type": "string", "maxLength": 24}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": _TEXT,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "role": {"enum": ["admin", "editor", "viewer"]},
            "address": {
                "type": "object",
                "properties": {"street": _TEXT, "city": _TEXT, "zip": _TEXT},
                "required": ["street", "city", "zip"],
            },
            "tags": {"type": "array", "items": _TEXT, "minItems": 3},
        },
        "required": ["name", "age", "role", "address", "tags"],
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "status": {"enum": ["new", "paid", "shipped"]},
            "items": {
                "type": "array",
                "minItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": _TEXT,
                        "quantity": {"type": "integer", "minimum": 1},
                        "price": {"type": "number"},
                    },
                    "required": ["sku", "quantity", "price"],
                },
            },
        },
        "required": ["id", "status", "items"],
    },
    "event": {
        "type": "object",
        "properties": {
            "title": _TEXT,
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "attendees": {
                "type": "array",
                "minItems": 4,
                "items": {
                    "type": "object",
                    "properties": {"name": _TEXT, "email": _TEXT},
                    "required": ["name", "email"],
                },
            },
        },
        "required": ["title", "date", "attendees"],
    },
}
CONSTRAINTS = [Constraint("json_schema", json.dumps(schema)) for schema in SCHEMAS.values()]


def constrained(params: list[SamplingParams]) -> list[SamplingParams]:
    """Request i gets schema i mod the number of schemas."""
    return [replace(p, constraint=CONSTRAINTS[i % len(CONSTRAINTS)]) for i, p in enumerate(params)]


def compile_times(engine) -> dict[str, dict[str, float]]:
    """Per schema: seconds to compile it cold (on a fresh cache) and again from the cache."""
    engine.grammars.compiled(Constraint("regex", "warm-up"))  # builds the tokenizer's grammar view
    out = {}
    for name, constraint in zip(SCHEMAS, CONSTRAINTS):
        times = []
        for _ in range(2):
            start = time.perf_counter()
            engine.grammars.compiled(constraint)
            times.append(time.perf_counter() - start)
        out[name] = {"cold_s": times[0], "cached_s": times[1]}
        print(f"schema {name}: compiled in {times[0] * 1e3:.1f} ms, {times[1] * 1e6:.1f} us cached", file=sys.stderr)
    return out


def run_json(bench) -> None:
    """offline (unconstrained) and offline_json (constrained), alternating on one engine; the prefix
    cache is reset before every run so neither mode reuses the other's prompts."""
    args = bench.args
    engine = bench_engine.build_engine(args)
    bench.dtype, bench.device = engine.runner.dtype, engine.runner.device
    bench.extra["engine"] = bench_engine.describe(engine)
    bench.extra["compile"] = compile_times(engine)
    modes = {"offline": bench.params, "offline_json": lambda reqs: constrained(bench.params(reqs))}
    for i in range(args.warmup_runs + args.repeat_runs):
        warmup = i < args.warmup_runs
        reqs = bench.requests(1000 + i if warmup else i - args.warmup_runs, warmup=warmup)
        for mode, params in modes.items():
            engine.reset_prefix_cache()
            with progress_bar(len(reqs), f"{mode} {'warm-up' if warmup else 'run'}", not args.no_progress) as bar:
                run = bench_engine.run_offline(engine, reqs, params(reqs), bar)
            if warmup:
                continue
            bench.runs.setdefault(mode, []).append(run)
            tokens = sum(r.completion_tokens for r in run.requests)
            print(
                f"{mode} run {i - args.warmup_runs + 1}/{args.repeat_runs}: {tokens} completion tokens in "
                f"{run.duration:.2f} s = {tokens / run.duration:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )


def compare_json(summaries: dict) -> dict:
    if "offline_json" not in summaries or "offline" not in summaries:
        return {}
    ratio = summaries["offline_json"].completion_tok_s / max(summaries["offline"].completion_tok_s, 1e-9)
    return {"offline_json_vs_offline": ratio}

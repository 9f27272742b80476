"""What the benchmark measures and how it summarises it.

Every time is taken by the benchmark itself (time.perf_counter), on the client side of whatever runs
the requests, so queueing, tokenization (without --pretok) and transport are all inside:
- TTFT: submission of the request -> arrival of its first generated token (queueing included).
- TPOT: (arrival of the last token - arrival of the first) / (completion tokens - 1); requests with a
  single token have none.
- ITL: every gap between two consecutive arrivals of generated tokens (one stream chunk may carry
  several tokens; the gap is counted once).
- E2E: submission -> arrival of the last token.
- Throughput: completion tokens (and prompt + completion tokens) per second of the run's wall time,
  from the first submission to the last token, prefill included. Completion tokens are counted from
  the ids the engine produced (through the HTTP gateway: the engine's count in the usage chunk), never
  by re-tokenizing text.
Distributions pool every request of every repeat run; per-run figures are kept beside them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tokenwire.bench.flags import BASELINES, ENGINE_MODES

if TYPE_CHECKING:
    from tokenwire.bench.baselines import Ceiling


@dataclass
class RequestRecord:
    submit_time: float  # when the benchmark handed the request over
    prompt_tokens: int = 0  # as counted by whoever tokenized it
    cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache (engine modes)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each batch of new tokens
    token_ids: list[int] = field(default_factory=list)  # every generated id, in order
    finish_time: float | None = None
    error: str | None = None
    # Streams that carry text, not ids (the HTTP gateway): the engine's count, from the usage chunk.
    reported_completion_tokens: int | None = None

    def add_chunk(self, now: float, ids: list[int]) -> None:
        if ids:
            self.chunk_times.append(now)
            self.token_ids.extend(ids)

    def add_arrival(self, now: float) -> None:
        """A chunk of new tokens whose ids the stream does not carry (see reported_completion_tokens)."""
        self.chunk_times.append(now)

    @property
    def completion_tokens(self) -> int:
        if self.token_ids or self.reported_completion_tokens is None:
            return len(self.token_ids)
        return self.reported_completion_tokens

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.submit_time if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        n = self.completion_tokens
        return (self.chunk_times[-1] - self.chunk_times[0]) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.chunk_times)) if len(self.chunk_times) > 1 else []

    @property
    def e2e(self) -> float | None:
        return self.chunk_times[-1] - self.submit_time if self.chunk_times else None


@dataclass
class RunRecord:
    mode: str
    start: float  # first submission
    end: float  # last token (or last completion)
    requests: list[RequestRecord]
    prompt_encodes: int | None = None  # prompts the engine tokenized during this run
    prefix_cache_hit_rate: float | None = None  # engine-reported, for this run's lookups
    reports_cached_tokens: bool = False  # whether records carry cached_prompt_tokens (engine modes)
    extra: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class Distribution:
    """Milliseconds."""

    count: int
    mean: float | None
    min: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> Distribution:
        if not seconds:
            return cls(0, None, None, None, None, None, None)
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(len(ms), float(ms.mean()), float(ms.min()), p50, p90, p99, float(ms.max()))


@dataclass
class RunSummary:
    duration_s: float
    completion_tokens: int
    prompt_tokens: int
    completion_tok_s: float
    total_tok_s: float
    request_s: float
    ttft_p50_ms: float | None
    tpot_p50_ms: float | None
    prompt_encodes: int | None
    prefix_cache_hit_rate: float | None


@dataclass
class ModeSummary:
    mode: str
    num_runs: int
    num_requests: int  # per run
    num_errors: int  # over all runs
    prompt_tokens: int  # per run (last run)
    completion_tokens: int  # per run (last run)
    duration_s: float  # mean over runs
    completion_tok_s: float  # mean over runs
    total_tok_s: float  # mean over runs
    request_s: float  # finished requests per second, mean over runs
    completion_tok_s_min: float
    completion_tok_s_max: float
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    prefix_cache_hit_rate: float | None  # token-level: cached prompt tokens / prompt tokens
    engine_prefix_cache_hit_rate: float | None  # as the engine reports it (block lookups)
    prompt_encodes: int | None  # engine encodes per run (max over runs); 0 with --pretok
    runs: list[RunSummary]
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_run(run: RunRecord) -> RunSummary:
    done = [r for r in run.requests if r.error is None]
    completion = sum(r.completion_tokens for r in run.requests)
    prompt = sum(r.prompt_tokens for r in run.requests)
    duration = max(run.duration, 1e-9)
    return RunSummary(
        duration_s=duration,
        completion_tokens=completion,
        prompt_tokens=prompt,
        completion_tok_s=completion / duration,
        total_tok_s=(prompt + completion) / duration,
        request_s=len(done) / duration,
        ttft_p50_ms=Distribution.of(_values(run.requests, "ttft")).p50,
        tpot_p50_ms=Distribution.of(_values(run.requests, "tpot")).p50,
        prompt_encodes=run.prompt_encodes,
        prefix_cache_hit_rate=run.prefix_cache_hit_rate,
    )


def summarize(mode: str, runs: list[RunRecord]) -> ModeSummary:
    if not runs:
        raise ValueError(f"{mode}: no timed run to summarise")
    per_run = [summarize_run(run) for run in runs]
    requests = [r for run in runs for r in run.requests]
    rates = [s.completion_tok_s for s in per_run]
    prompt_tokens = sum(r.prompt_tokens for r in requests)
    cached = sum(r.cached_prompt_tokens for r in requests)
    engine_rates = [run.prefix_cache_hit_rate for run in runs if run.prefix_cache_hit_rate is not None]
    encodes = [run.prompt_encodes for run in runs if run.prompt_encodes is not None]
    last = per_run[-1]
    return ModeSummary(
        mode=mode,
        num_runs=len(runs),
        num_requests=len(runs[-1].requests),
        num_errors=sum(r.error is not None for r in requests),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        duration_s=_mean([s.duration_s for s in per_run]),
        completion_tok_s=_mean(rates),
        total_tok_s=_mean([s.total_tok_s for s in per_run]),
        request_s=_mean([s.request_s for s in per_run]),
        completion_tok_s_min=min(rates),
        completion_tok_s_max=max(rates),
        ttft_ms=Distribution.of(_values(requests, "ttft")),
        tpot_ms=Distribution.of(_values(requests, "tpot")),
        itl_ms=Distribution.of([gap for r in requests for gap in r.itls]),
        e2e_ms=Distribution.of(_values(requests, "e2e")),
        prefix_cache_hit_rate=(
            cached / prompt_tokens if prompt_tokens and all(run.reports_cached_tokens for run in runs) else None
        ),
        engine_prefix_cache_hit_rate=_mean(engine_rates) if engine_rates else None,
        prompt_encodes=max(encodes) if encodes else None,
        runs=per_run,
        extra=dict(runs[-1].extra),
    )


def latency_samples(runs: list[RunRecord]) -> dict[str, list[float]]:
    """Raw per-request latencies in ms (for CDF plots)."""
    requests = [r for run in runs for r in run.requests]
    out = {name: [v * 1e3 for v in _values(requests, name)] for name in ("ttft", "tpot", "e2e")}
    out["itl"] = [gap * 1e3 for r in requests for gap in r.itls]
    return out


def _values(requests: list[RequestRecord], name: str) -> list[float]:
    return [v for v in (getattr(r, name) for r in requests) if v is not None]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def compare(summaries: dict, ceiling: Ceiling | None) -> dict:
    """Completion tok/s ratios: each engine mode against each baseline, and against the ceiling."""
    out = {}
    for mode in (m for m in summaries if m.startswith("online_")):  # the gateway against the SDK path
        if "online" in summaries:
            sdk, gateway = summaries["online"], summaries[mode]
            out[f"{mode}_vs_online"] = gateway.completion_tok_s / max(sdk.completion_tok_s, 1e-9)
            if sdk.ttft_ms.p50 is not None and gateway.ttft_ms.p50 is not None:
                out[f"{mode}_ttft_p50_overhead_ms"] = gateway.ttft_ms.p50 - sdk.ttft_ms.p50
    for mode in (m for m in ENGINE_MODES if m in summaries):
        for base in (b for b in BASELINES if b in summaries and b != mode):
            out[f"{mode}_vs_{base}"] = summaries[mode].completion_tok_s / max(summaries[base].completion_tok_s, 1e-9)
        if ceiling is not None:  # one stream at a time is bounded by the single-stream (memory) floor
            limit = ceiling.single_stream_tok_s if mode == "naive" else ceiling.completion_tok_s
            out[f"{mode}_fraction_of_ceiling"] = summaries[mode].completion_tok_s / limit
            if mode != "naive" and ceiling.engine_gemm_completion_tok_s:
                out[f"{mode}_fraction_of_engine_gemm_ceiling"] = (
                    summaries[mode].completion_tok_s / ceiling.engine_gemm_completion_tok_s
                )
    if "naive" in summaries and "llamacpp" in summaries and summaries["llamacpp"].tpot_ms.p50:
        out["naive_tpot_vs_llamacpp"] = (summaries["naive"].tpot_ms.p50 or 0) / summaries["llamacpp"].tpot_ms.p50
    if ceiling is not None:
        out["ceiling_completion_tok_s"] = ceiling.completion_tok_s
        if ceiling.engine_gemm_completion_tok_s:
            out["engine_gemm_ceiling_completion_tok_s"] = ceiling.engine_gemm_completion_tok_s
        out["single_stream_floor_tpot_ms"] = ceiling.memory_floor_s * 1e3
        if "naive" in summaries and summaries["naive"].tpot_ms.p50:
            out["naive_tpot_vs_floor"] = summaries["naive"].tpot_ms.p50 / (ceiling.memory_floor_s * 1e3)
    return out


def agreement(runs: dict[str, list[RunRecord]], greedy: bool) -> dict:
    """Greedy sanity check: the fraction of requests whose ids equal generate()'s, last runs compared.
    Informative only: a padded batch's float rounding can flip a near-tie and fork the rest."""
    if not greedy or "hf_static" not in runs:
        return {}
    ref = [r.token_ids for r in runs["hf_static"][-1].requests]
    return {
        f"{mode}_same_ids_as_hf_static": sum(a.token_ids == b for a, b in zip(rs[-1].requests, ref)) / len(ref)
        for mode, rs in runs.items()
        if mode in ENGINE_MODES and len(rs[-1].requests) == len(ref)
    }

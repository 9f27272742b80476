"""The in-process engine modes of the benchmark: `offline` (everything submitted at once) and `naive`
(one request at a time through the same engine). The benchmark drives `step()` itself, on this thread,
and stamps every token when the step that made it returns.
"""

from __future__ import annotations

import time

from tokenwire.bench.metrics import RequestRecord, RunRecord
from tokenwire.bench.workloads import BenchRequest
from tokenwire.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenwire.engine.core.engine import LLMEngine
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.worker.device import dtype_name


def build_engine(args) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            few_row_gemv=args.few_row_gemv,
            quantization=args.quantization,
            quantized_dense_copy=args.quantized_dense_copy,
            model_impl=args.model_impl,
            cache=CacheConfig(
                enable_prefix_cache=not args.no_prefix_cache,
                kv_cache_memory_gb=args.kv_cache_memory_gb,
                kv_cache_dtype=args.kv_cache_dtype,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                speculative=args.speculative,
                num_speculative_tokens=args.num_speculative_tokens,
            ),
        )
    )


def describe(engine: LLMEngine) -> dict:
    runner, cfg = engine.runner, engine.config
    return {
        "architecture": runner.architecture,
        "model_impl": runner.model_impl,
        "device": str(runner.device),
        "dtype": dtype_name(runner.dtype),
        "num_kv_blocks": runner.num_blocks,
        "kv_cache_dtype": dtype_name(runner.kv_dtype),
        "few_row_gemv": cfg.few_row_gemv,
        "quantization": runner.quantization,
        "quantized_dense_copy": cfg.quantized_dense_copy,
        "weight_bytes": runner.weight_bytes(),
        "block_size": runner.block_size,
        "max_model_len": engine.max_model_len,
        "enable_prefix_cache": cfg.cache.enable_prefix_cache,
        "max_num_seqs": cfg.scheduler.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
        "speculative": cfg.scheduler.speculative,
        "num_speculative_tokens": cfg.scheduler.num_speculative_tokens,
    }


def run_offline(
    engine: LLMEngine, requests: list[BenchRequest], params: list[SamplingParams], progress=None
) -> RunRecord:
    """All requests handed over at once (text ones are encoded by the engine, inside the timing)."""
    with _RunStats(engine) as stats:
        start = time.perf_counter()
        records = {_submit(engine, req, p): RequestRecord(submit_time=start) for req, p in zip(requests, params)}
        _drain(engine, records, progress)
    return stats.record("offline", start, list(records.values()))


def run_naive(
    engine: LLMEngine, requests: list[BenchRequest], params: list[SamplingParams], progress=None
) -> RunRecord:
    """The same requests, each submitted only after the previous one finished."""
    with _RunStats(engine) as stats:
        start = time.perf_counter()
        records = []
        for req, p in zip(requests, params):
            submitted = time.perf_counter()
            one = {_submit(engine, req, p): RequestRecord(submit_time=submitted)}
            _drain(engine, one, progress)
            records.extend(one.values())
    return stats.record("naive", start, records)


def _submit(engine: LLMEngine, req: BenchRequest, params: SamplingParams) -> str:
    if req.token_ids is not None:
        return engine.add_request(prompt_token_ids=req.token_ids, params=params)
    return engine.add_request(prompt=req.text, params=params)


def _drain(engine: LLMEngine, records: dict[str, RequestRecord], progress) -> None:
    """Step until every request is done; stamp each token when its step returns."""
    while engine.has_unfinished():
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            rec = records[out.request_id]
            rec.add_chunk(now, list(out.new_token_ids))
            if out.finished:
                rec.finish_time = now
                rec.prompt_tokens = out.num_prompt_tokens
                rec.cached_prompt_tokens = out.num_cached_prompt_tokens
                rec.error = out.error
                if progress is not None:
                    progress.update(1)


class _RunStats:
    """Engine counters over one run: prompts it encoded, and prefix-cache lookups and hits."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine

    def __enter__(self) -> _RunStats:
        # Runs already use distinct prompts; a reset also clears the entries of a repeated --prompt.
        self.engine.reset_prefix_cache()
        self.encodes, self.cache = self.engine.num_prompt_encodes, self._cache_counts()
        self.encode_s = self.engine.prompt_encode_s
        stats = self.engine.stats()
        self.preemptions = stats.num_preemptions
        self.drafts = (stats.num_draft_tokens, stats.num_accepted_draft_tokens)
        self.steps = self.engine.step_profile.snapshot()
        return self

    def __exit__(self, *exc) -> None:
        self.end = time.perf_counter()

    def _cache_counts(self) -> tuple[int, int]:
        stats = self.engine.block_manager.prefix_cache_stats
        return stats.queried_tokens, stats.hit_tokens

    def record(self, mode: str, start: float, records: list[RequestRecord]) -> RunRecord:
        now = self._cache_counts()
        rate = None
        if self.engine.config.cache.enable_prefix_cache:
            queried, hit = now[0] - self.cache[0], now[1] - self.cache[1]
            rate = hit / queried if queried else 0.0
        end = max([self.end] + [r.finish_time for r in records if r.finish_time is not None])
        stats = self.engine.stats()
        return RunRecord(
            mode,
            start,
            end,
            records,
            prompt_encodes=self.engine.num_prompt_encodes - self.encodes,
            prefix_cache_hit_rate=rate,
            reports_cached_tokens=True,
            extra={
                "num_preemptions": stats.num_preemptions - self.preemptions,
                "num_draft_tokens": stats.num_draft_tokens - self.drafts[0],
                "num_accepted_draft_tokens": stats.num_accepted_draft_tokens - self.drafts[1],
                "prompt_encode_s": self.engine.prompt_encode_s - self.encode_s,
                "step_profile": self.engine.step_profile.minus(self.steps).to_dict(),
            },
        )

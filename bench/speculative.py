"""Speculative decoding measured against itself: the engine modes (offline, naive) on two engines of the same
model, speculation off and `ngram`, runs interleaved so both see the same machine (`--spec-compare`, the
copy workload's default). Mode `X_spec` is mode X with drafts.

Reports, as ratios within the one run: TPOT p50 off / on (> 1: speculation is faster), completion tok/s on /
off, the draft acceptance rate, and for greedy runs the fraction of requests with identical ids.
"""

from __future__ import annotations

import sys
from argparse import Namespace

from tokenwire.bench import engine as bench_engine
from tokenwire.bench.metrics import RunRecord
from tokenwire.bench.report import progress_bar

SUFFIX = "_spec"


def run_compare(bench) -> None:
    """Each wanted engine mode, off then on, per run; warm-up runs are discarded."""
    args = bench.args
    drafting = args.speculative if args.speculative != "off" else "ngram"  # --spec-compare alone: n-gram
    engines = {
        kind: bench_engine.build_engine(Namespace(**{**vars(args), "speculative": speculative}))
        for kind, speculative in (("off", "off"), ("on", drafting))
    }
    bench.dtype, bench.device = engines["off"].runner.dtype, engines["off"].runner.device
    bench.extra["engine"] = bench_engine.describe(engines["on"])
    runners = {"offline": bench_engine.run_offline, "naive": bench_engine.run_naive}
    for mode in (m for m in runners if m in bench.modes):
        for i in range(args.warmup_runs + args.repeat_runs):
            warmup = i < args.warmup_runs
            reqs = bench.requests(1000 + i if warmup else i - args.warmup_runs, warmup=warmup)
            for kind, engine in engines.items():
                name = mode + (SUFFIX if kind == "on" else "")
                with progress_bar(len(reqs), f"{name} {'warm-up' if warmup else 'run'}", not args.no_progress) as bar:
                    run = runners[mode](engine, reqs, bench.params(reqs), bar)
                if not warmup:
                    _keep(bench, name, run, i - args.warmup_runs + 1)


def _keep(bench, name: str, run: RunRecord, number: int) -> None:
    bench.runs.setdefault(name, []).append(run)
    tokens = sum(r.completion_tokens for r in run.requests)
    drafted, accepted = run.extra["num_draft_tokens"], run.extra["num_accepted_draft_tokens"]
    rate = f", {accepted}/{drafted} drafts accepted" if drafted else ""
    print(
        f"{name} run {number}/{bench.args.repeat_runs}: {tokens} completion tokens in {run.duration:.2f} s "
        f"= {tokens / run.duration:.1f} tok/s{rate}",
        file=sys.stderr,
        flush=True,
    )


def compare_spec(summaries: dict, runs: dict[str, list[RunRecord]], greedy: bool) -> dict:
    """Per mode run both ways: TPOT p50 off / on, tok/s on / off, acceptance rate, same-ids fraction."""
    out = {}
    for mode in ("offline", "naive"):
        on, off = summaries.get(mode + SUFFIX), summaries.get(mode)
        if on is None or off is None:
            continue
        if on.tpot_ms.p50 and off.tpot_ms.p50:
            out[f"{mode}_tpot_p50_off_over_spec"] = off.tpot_ms.p50 / on.tpot_ms.p50
        out[f"{mode}_spec_tok_s_vs_off"] = on.completion_tok_s / max(off.completion_tok_s, 1e-9)
        drafted = sum(r.extra["num_draft_tokens"] for r in runs[mode + SUFFIX])
        accepted = sum(r.extra["num_accepted_draft_tokens"] for r in runs[mode + SUFFIX])
        out[f"{mode}_spec_draft_tokens"] = drafted
        out[f"{mode}_spec_acceptance_rate"] = accepted / drafted if drafted else 0.0
        tokens = sum(r.completion_tokens for run in runs[mode + SUFFIX] for r in run.requests)
        out[f"{mode}_spec_accepted_per_token"] = accepted / max(tokens, 1)
        if greedy:
            pairs = [
                (a.token_ids, b.token_ids)
                for run_on, run_off in zip(runs[mode + SUFFIX], runs[mode])
                for a, b in zip(run_on.requests, run_off.requests)
            ]
            out[f"{mode}_spec_same_ids_as_off"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    return out

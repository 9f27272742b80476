"""`tokenwire-bench` (also `tokenwire bench`, `python -m tokenwire.bench`): how fast tokenwire is, measured honestly, beside its baselines.

Modes (comma-separated `--mode`, run in this order, one process):
  offline  every request submitted to the in-process engine at once; throughput.
  naive    the same requests one at a time through the same engine.
  online   through the real gRPC services (started here, or given by address), streaming, at a Poisson
           `--request-rate` and/or a `--concurrency` bound. `--endpoint grpc,openai` runs it through the
           SDK (`online`) and through the OpenAI-compatible gateway (`online_openai`; `sse`: raw SSE,
           `online_sse`) in one invocation, on the same services, and reports the ratio.
  online_etext  as online, but the SDK takes the text from the engine (`return_text`), not DecodeStream.
  online_ids  the engine service alone: ids in (tokenized before the timed region), ids out, no text, no
           SDK, raw grpc.aio stubs. Online modes print each process's CPU seconds per 1,000 tokens.
  replicas through `--replicas` engine replicas started here, as `online`, under three setups: round robin,
           prefix-affinity routing, and one replica; hit rate, TTFT and requests per replica side by side
           (default of the multiprefix workload; see replicas.py).
  llamacpp llama.cpp (llama-cpp-python, the optional extra) on the same GGUF file and ids, one request at
           a time: the single-stream baseline of `naive` (bench/llamacpp.py).
  hf       transformers `generate()` (one static left-padded batch) and `generate_batch()` (its
           continuous batching): same checkpoint, dtype and prompts. `hf_static` / `hf_batch` alone too.
`tokenwire-bench soak` is the engine service's memory soak instead (bench/soak.py, its own flags).
The json workload runs offline twice per run, with a JSON schema per request (`offline_json`) and without.
`--spec-compare` (the copy workload's default) runs offline/naive on two engines, speculation off and ngram,
interleaved (`naive` / `naive_spec`), and reports the TPOT ratio and the acceptance rate (bench/speculative.py).
`--pretok` tokenizes text prompts before the timed region and sends ids (the engine then encodes
nothing); without it, text goes in and tokenization is timed. Metrics: see metrics.py.

    tokenwire-bench --workload P1 --json p1.json --plot p1.png
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
from dataclasses import asdict

import torch
from tokenwire.bench import baselines as hf
from tokenwire.bench import speculative, structured
from tokenwire.bench.flags import DEFAULT_MODES, ONLINE_MODES, build_parser, parse_endpoints, parse_modes
from tokenwire.bench.metrics import RunRecord, agreement, compare, latency_samples, summarize
from tokenwire.bench.proc_cpu import openmp_placement
from tokenwire.bench.report import (
    cpu_busy_cores,
    environment,
    format_replicas_table,
    format_table,
    openmp_lines,
    progress_bar,
    write_json,
    write_plot,
)
from tokenwire.bench.workloads import BenchRequest, build_requests, make_spec, pretokenize, warmup_requests
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.serving.model_resolver import gguf_file, resolve_model
from transformers import AutoTokenizer

log = logging.getLogger("tokenwire.bench")


def sampling_params(args, max_new_tokens: int, ignore_eos: bool, index: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        ignore_eos=ignore_eos,
        seed=None if args.temperature == 0 else args.seed + index,
    )


class Bench:
    """One benchmark invocation: the workload, its prompts per run, and the modes' timed runs."""

    def __init__(self, args):
        self.args = args
        self.spec = make_spec(
            args.workload,
            prompt=args.prompt,
            prompts_file=args.prompts_file,
            input_len=args.input_len,
            input_len_range=tuple(args.input_len_range or ()) or None,
            shared_prefix_len=args.shared_prefix_len,
            num_prefixes=args.num_prefixes,
            num_requests=args.num_requests,
            max_new_tokens=args.max_new_tokens,
            ignore_eos=args.ignore_eos,
            request_rate=args.request_rate,
            seed=args.seed,
        )
        self.model_dir = resolve_model(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.modes = parse_modes(args.mode or DEFAULT_MODES.get(self.spec.name, "offline"))
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self.runs: dict[str, list[RunRecord]] = {}
        self.extra: dict = {}
        self.replica_loads: dict[str, dict] = {}  # replicas mode: setup -> its SetupLoad (last run)
        self.busy_cores_before = cpu_busy_cores()
        compare_default = self.spec.name == "copy"
        self.spec_compare = compare_default if args.spec_compare is None else args.spec_compare

    def requests(self, variant: int, warmup: bool = False, ids: bool = False) -> list[BenchRequest]:
        """Run `variant`'s prompts: same lengths every run, fresh content, so no run reuses another's
        prefix-cache entries. --pretok tokenizes here, outside every timed region."""
        reqs = build_requests(self.spec, self.tokenizer, variant)
        if warmup:
            reqs = warmup_requests(
                reqs, self.args.warmup_max_requests, self.args.warmup_max_prompt_tokens, self.args.warmup_max_new_tokens
            )
        return pretokenize(reqs, self.tokenizer) if self.args.pretok or ids else reqs

    def params(self, requests: list[BenchRequest]) -> list[SamplingParams]:
        return [sampling_params(self.args, r.max_new_tokens, self.spec.ignore_eos, i) for i, r in enumerate(requests)]

    def repeat(self, mode: str, run_once, variant_base: int = 0, ids: bool = False) -> None:
        """Warm-up runs (discarded), then the timed runs, each on its own prompt variant (`variant_base`
        keeps two modes on one server from sharing prefix-cache entries)."""
        args = self.args
        for i in range(args.warmup_runs):
            reqs = self.requests(1000 + variant_base + i, warmup=True, ids=ids)
            with progress_bar(len(reqs), f"{mode} warm-up", not args.no_progress) as bar:
                run_once(reqs, bar)
        for i in range(args.repeat_runs):
            reqs = self.requests(variant_base + i, ids=ids)
            with progress_bar(len(reqs), f"{mode} run {i + 1}/{args.repeat_runs}", not args.no_progress) as bar:
                run = run_once(reqs, bar)
            self.runs.setdefault(mode, []).append(run)
            tokens = sum(r.completion_tokens for r in run.requests)
            print(
                f"{mode} run {i + 1}/{args.repeat_runs}: {tokens} completion tokens in {run.duration:.2f} s "
                f"= {tokens / run.duration:.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )

    # ---- modes ----

    def run_engine_modes(self) -> None:
        """offline and naive, each on a fresh engine: no mode inherits another's prefix-cache entries."""
        from tokenwire.bench import engine as bench_engine

        if self.spec.name == "json":
            return structured.run_json(self)
        if self.spec_compare:
            return speculative.run_compare(self)
        for mode in (m for m in ("offline", "naive") if m in self.modes):
            self._run_engine_mode(mode, bench_engine)
            gc.collect()  # the mode's engine is gone: its memory is back before the next one loads

    def _run_engine_mode(self, mode: str, bench_engine) -> None:
        engine = bench_engine.build_engine(self.args)
        self.dtype, self.device = engine.runner.dtype, engine.runner.device
        self.extra["engine"] = bench_engine.describe(engine)
        self.extra["engine"]["openmp"] = openmp_placement(os.getpid(), os.environ)
        runner = bench_engine.run_offline if mode == "offline" else bench_engine.run_naive
        self.repeat(mode, lambda reqs, bar: runner(engine, reqs, self.params(reqs), bar))

    def run_online(self) -> None:
        if not any(m in self.modes for m in ONLINE_MODES):
            return
        from tokenwire.bench import online as bench_online

        endpoints = parse_endpoints(self.args.endpoint)
        with bench_online.services(self.args, self.model_dir, endpoints) as client:
            self.extra["online"] = client.describe()
            if self.dtype is None:  # the baselines then run in the served engine's dtype
                self.dtype = getattr(torch, self.extra["online"]["dtype"])
                self.device = torch.device(self.extra["online"]["device"])
            runs = []  # (mode, runner, whether its requests carry ids): each on prompts of its own
            if "online" in self.modes:
                runs += [
                    (bench_online.mode_name(e), functools.partial(bench_online.run, endpoint=e), False)
                    for e in endpoints
                ]
            if "online_etext" in self.modes:
                runs.append(("online_etext", functools.partial(bench_online.run, text_from="engine"), False))
            if "online_ids" in self.modes:
                runs.append(("online_ids", bench_online.run_ids, True))
            for base, (mode, runner, ids) in enumerate(runs):
                self.repeat(
                    mode,
                    lambda reqs, bar, runner=runner: runner(
                        client,
                        reqs,
                        self.params(reqs),
                        self.spec.request_rate,
                        self.args.concurrency,
                        self.args.seed,
                        bar,
                    ),
                    variant_base=100 * base,
                    ids=ids,
                )

    def run_replicas(self) -> None:
        """The three setups on the same running replicas, each with prompts no other setup sent."""
        if "replicas" not in self.modes:
            return
        from tokenwire.bench import replicas as bench_replicas

        with bench_replicas.cluster(self.args, self.model_dir, self.args.replicas) as cluster:
            self.extra["replicas"] = cluster.describe() | cluster.client("single").describe()
            if self.dtype is None:
                self.dtype = getattr(torch, self.extra["replicas"]["dtype"])
                self.device = torch.device(self.extra["replicas"]["device"])
            for k, setup in enumerate(bench_replicas.SETUPS):
                self.repeat(
                    setup,
                    lambda reqs, bar, setup=setup: bench_replicas.run(
                        cluster,
                        setup,
                        reqs,
                        self.params(reqs),
                        self.spec.request_rate,
                        self.args.concurrency,
                        self.args.seed,
                        bar,
                    ),
                    variant_base=10_000 * (k + 1),
                )
                self.replica_loads[setup] = self.runs[setup][-1].extra["replicas"]

    def run_baselines(self) -> None:
        if "llamacpp" in self.modes:
            self.run_llamacpp()
        wanted = [m for m in ("hf_static", "hf_batch") if m in self.modes]
        if not wanted:
            return
        self.resolve_dtype()
        self._run_hf_modes(wanted, hf.load_hf_model(self.model_dir, self.device, self.dtype))
        gc.collect()  # the HF model is gone before anything else loads

    def run_llamacpp(self) -> None:
        """llama.cpp on the same GGUF file, one request at a time, on the same ids (see llamacpp.py)."""
        from tokenwire.bench import llamacpp

        model = llamacpp.load(gguf_file(self.args.model), context_len=4096, seed=self.args.seed)
        self.repeat("llamacpp", lambda reqs, bar: llamacpp.run(model, reqs, self.params(reqs), bar), ids=True)

    def _run_hf_modes(self, wanted: list[str], model) -> None:
        for mode in wanted:
            if mode == "hf_static":
                self.repeat(
                    mode,
                    lambda reqs, bar: hf.run_hf_static(
                        model, self.tokenizer, reqs, self.params(reqs)[0], self.args.hf_batch_size, bar
                    ),
                )
            else:
                self.repeat(
                    mode, lambda reqs, bar: hf.run_hf_batch(model, self.tokenizer, reqs, self.params(reqs)[0], bar)
                )

    def resolve_dtype(self) -> None:
        """The engine's dtype when an engine ran; otherwise the engine's own `auto` rule."""
        if self.dtype is None or self.device is None:
            from tokenwire.engine.worker.device import choose_device, choose_dtype

            self.device = choose_device(self.args.device)
            self.dtype = choose_dtype(self.args.dtype, self.device)

    def run_ceiling(self) -> hf.Ceiling | None:
        wanted = self.args.ceiling if self.args.ceiling is not None else self.spec.name == "P1"
        if not wanted:
            return None
        self.resolve_dtype()
        if self.device.type != "cpu":
            log.warning("the ceiling is measured on the CPU only; skipped on %s", self.device)
            return None
        reqs = build_requests(self.spec, self.tokenizer, 0)
        lens = [len(r.token_ids) if r.token_ids is not None else len(self.tokenizer.encode(r.text)) for r in reqs]
        return hf.measure_ceilings(self.model_dir, self.dtype, lens, self.spec.max_new_tokens)

    # ---- report ----

    def report(self, ceiling: hf.Ceiling | None) -> dict:
        summaries = {mode: summarize(mode, runs) for mode, runs in self.runs.items()}
        comparisons = compare(summaries, ceiling)
        comparisons.update(agreement(self.runs, self.args.temperature == 0) | structured.compare_json(summaries))
        comparisons.update(speculative.compare_spec(summaries, self.runs, self.args.temperature == 0))
        replicas, replicas_table = self.replicas_report(summaries, comparisons)
        print(format_table(list(summaries.values()), comparisons))
        for line in openmp_lines(self.extra):
            print(line)
        if replicas_table:
            print(replicas_table)
        report = {
            "workload": asdict(self.spec) | {"pretok": self.args.pretok, "modes": self.modes},
            "args": vars(self.args),
            "environment": environment(
                str(self.dtype).removeprefix("torch."), str(self.device), self.busy_cores_before
            ),
            "modes": {m: s.to_dict() for m, s in summaries.items()},
            "ceiling": asdict(ceiling) | {"completion_tok_s": ceiling.completion_tok_s, "total_s": ceiling.total_s}
            if ceiling
            else None,
            "comparisons": comparisons,
            "replicas": replicas,
            "extra": self.extra,
        }
        if self.args.json_out:
            write_json(self.args.json_out, report)
        if self.args.plot:
            write_plot(
                self.args.plot,
                {m: latency_samples(r) for m, r in self.runs.items()},
                {m: s.completion_tok_s for m, s in summaries.items()},
                ceiling.completion_tok_s if ceiling else None,
                comparisons,
                f"tokenwire bench: {self.spec.name}, {report['environment']['dtype']}, "
                f"{report['environment']['cpu_capability']}",
            )
        return report

    def replicas_report(self, summaries: dict, comparisons: dict) -> tuple[dict | None, str]:
        """The replicas mode's JSON and side-by-side table (None, "" without it); adds its ratios to
        `comparisons`."""
        if not self.replica_loads:
            return None, ""
        from tokenwire.bench import replicas as bench_replicas

        comparisons.update(bench_replicas.compare(summaries, self.replica_loads))
        targets = bench_replicas.targets(comparisons)
        setups = {
            setup: load
            | {
                "prefix_cache_hit_rate": summaries[setup].prefix_cache_hit_rate,
                "ttft_p50_ms": summaries[setup].ttft_ms.p50,
            }
            for setup, load in self.replica_loads.items()
        }
        return {"setups": setups, "targets": targets}, format_replicas_table(summaries, self.replica_loads, targets)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["soak"]:  # the memory soak: its own flags (tokenwire-bench soak --help)
        from tokenwire.bench import soak

        return soak.main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.warmup_runs < 0 or args.repeat_runs < 1:
        raise SystemExit("--warmup-runs must be >= 0 and --repeat-runs >= 1")
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    bench = Bench(args)
    print(
        f"workload {bench.spec.name}: {bench.spec.num_requests} requests, {bench.spec.max_new_tokens} new tokens, "
        f"modes {', '.join(bench.modes)}, {'ids (--pretok)' if args.pretok else 'prompts as given'}",
        file=sys.stderr,
    )
    if bench.busy_cores_before is not None and bench.busy_cores_before > 0.5:
        print(
            f"warning: other processes keep {bench.busy_cores_before:.1f} of {os.cpu_count()} CPUs busy: "
            f"they will distort every figure",
            file=sys.stderr,
        )
    bench.run_engine_modes()
    bench.run_online()
    bench.run_replicas()
    bench.run_baselines()
    bench.report(bench.run_ceiling())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The benchmark end to end on the tiny model: every mode runs, the JSON holds every figure with sane
values, --pretok keeps the engine from encoding, the prefix cache shows up in the hit rate.
No timing thresholds: timings on a shared 2-core machine are not test material."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
from tokenwire.bench import cli as bench_cli
from tokenwire.bench import model_impl as bench_model_impl
from tokenwire.bench import profile as bench_profile
from tokenwire.bench.replicas import Counters, parse_counters
from tokenwire.bench.report import openmp_lines
from tokenwire.bench.workloads import build_requests, make_spec, p1_prompt_lengths, usable_ids
from tokenwire.engine.core.openmp import apply_openmp_defaults
from tokenwire.engine.worker.device import choose_dtype
from tokenwire.serving.launcher import command
from transformers import AutoTokenizer

N, NEW = 4, 4
MODE_FIELDS = (
    "num_runs",
    "num_requests",
    "num_errors",
    "prompt_tokens",
    "completion_tokens",
    "duration_s",
    "completion_tok_s",
    "total_tok_s",
    "request_s",
    "ttft_ms",
    "tpot_ms",
    "itl_ms",
    "e2e_ms",
    "prefix_cache_hit_rate",
    "prompt_encodes",
    "runs",
)
ENV_FIELDS = (
    "python",
    "packages",
    "cpu_model",
    "cpu_capability",
    "avx512_bf16",
    "torch_threads",
    "dtype",
    "device",
    "git_revision",
    "busy_cores_before",
    "loadavg_after",
)


def auto_dtype() -> str:
    """What dtype `auto` picks on this machine (bf16 where it is native and faster, else fp32)."""
    return str(choose_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def run_bench(tmp_path, model: str, *flags: str) -> dict:
    out = tmp_path / "bench.json"
    argv = [
        "--model",
        model,
        "--workload",
        "custom",
        "--input-len-range",
        "8",
        "24",
        "--num-requests",
        str(N),
        "--max-new-tokens",
        str(NEW),
        "--ignore-eos",
        "--no-progress",
        "--json",
        str(out),
        *flags,
    ]
    assert bench_cli.main(argv) == 0
    return json.loads(out.read_text())


def check_mode(report: dict, mode: str, runs: int = 1) -> dict:
    m = report["modes"][mode]
    assert all(f in m for f in MODE_FIELDS), set(MODE_FIELDS) - set(m)
    assert (m["num_runs"], m["num_requests"], m["num_errors"]) == (runs, N, 0)
    assert m["completion_tokens"] == N * NEW  # ignore_eos: every request runs to max_new_tokens
    assert m["prompt_tokens"] >= N * 8
    assert m["completion_tok_s"] > 0 and m["total_tok_s"] > m["completion_tok_s"]
    for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
        d = m[name]
        assert d["count"] == N * runs and 0 < d["min"] <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"]
    if mode.startswith("online"):  # a stream message may carry several tokens (deltas merge for a slow reader)
        assert 0 < m["itl_ms"]["count"] <= N * runs * (NEW - 1)
    else:
        assert m["itl_ms"]["count"] == N * runs * (NEW - 1)
    assert m["ttft_ms"]["p50"] <= m["e2e_ms"]["max"]
    assert len(m["runs"]) == runs
    return m


def test_p1_workload_has_the_ceiling_scripts_prompt_lengths(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = make_spec("P1")
    assert (spec.num_requests, spec.max_new_tokens, spec.ignore_eos) == (32, 64, True)
    first, second = build_requests(spec, tokenizer, 0), build_requests(spec, tokenizer, 1)
    assert [len(r.token_ids) for r in first] == p1_prompt_lengths() == [len(r.token_ids) for r in second]
    assert first[0].token_ids != second[0].token_ids  # runs share no prefix
    usable = set(usable_ids(tokenizer))
    assert all(t in usable for r in first for t in r.token_ids) and all(r.text is None for r in first)


def test_offline_naive_and_hf_baselines_report_every_figure(tmp_path, tiny_llama_dir):
    plot = tmp_path / "bench.png"
    report = run_bench(
        tmp_path, tiny_llama_dir, "--mode", "offline,naive,hf", "--repeat-runs", "2", "--ceiling", "--plot", str(plot)
    )
    for mode in ("offline", "naive", "hf_static", "hf_batch"):
        check_mode(report, mode, runs=2)
    assert report["modes"]["offline"]["prompt_encodes"] == N  # text prompts: the engine encodes each once
    assert report["modes"]["offline"]["extra"]["prompt_encode_s"] > 0
    assert report["modes"]["hf_static"]["prompt_encodes"] is None
    env = report["environment"]
    assert all(f in env for f in ENV_FIELDS) and env["dtype"] == auto_dtype()  # what `auto` picks here
    assert report["ceiling"]["completion_tok_s"] > 0
    assert report["ceiling"]["memory_floor_s"] > 0 and report["ceiling"]["bandwidth_gbs"] > 0
    comparisons = report["comparisons"]
    for key in (
        "offline_vs_hf_static",
        "offline_vs_hf_batch",
        "offline_fraction_of_ceiling",
        "naive_vs_offline",
        "naive_fraction_of_ceiling",
        "naive_tpot_vs_floor",
        "single_stream_floor_tpot_ms",
        "offline_fraction_of_engine_gemm_ceiling",
        "engine_gemm_ceiling_completion_tok_s",
    ):
        assert comparisons[key] > 0
    assert 0 <= comparisons["offline_same_ids_as_hf_static"] <= 1
    assert plot.stat().st_size > 10_000


def test_pretok_leaves_the_engine_nothing_to_encode(tmp_path, tiny_llama_dir):
    report = run_bench(tmp_path, tiny_llama_dir, "--mode", "offline", "--pretok", "--warmup-runs", "0")
    offline = check_mode(report, "offline")
    assert offline["prompt_encodes"] == 0
    assert report["workload"]["pretok"] is True
    # The engine's own step profile: one step prefills all 4 short prompts (and samples their first
    # token), then NEW - 1 decode-only steps; each phase took some time.
    profile = offline["extra"]["step_profile"]
    assert (profile["prefill"]["steps"], profile["decode"]["steps"]) == (1, NEW - 1)
    assert all(ms > 0 for ms in profile["decode"]["per_step"].values())


@pytest.mark.parametrize("cache", [True, False])
def test_shared_prefix_shows_in_the_hit_rate(tmp_path, tiny_llama_dir, cache):
    flags = ["--mode", "naive", "--shared-prefix-len", "48", "--warmup-runs", "0"]
    report = run_bench(tmp_path, tiny_llama_dir, *flags, *([] if cache else ["--no-prefix-cache"]))
    rate = check_mode(report, "naive")["prefix_cache_hit_rate"]
    assert (rate > 0.3) if cache else rate == 0  # requests 2..N reuse the 48-token prefix's 3 blocks


def test_online_mode_streams_through_both_grpc_services(tmp_path, tiny_llama_dir):
    report = run_bench(
        tmp_path,
        tiny_llama_dir,
        "--mode",
        "online,online_ids",
        "--request-rate",
        "50",
        "--concurrency",
        "2",
        "--warmup-runs",
        "0",
    )
    m = check_mode(report, "online")
    assert m["prompt_encodes"] == 0  # text went through the tokenizer service, ids to the engine
    assert report["extra"]["online"]["dtype"] == auto_dtype()
    assert set(m["extra"]["cpu_s_per_1k_tokens"]) == {"engine core", "engine front", "tokenizer", "bench client"}
    ids = check_mode(report, "online_ids")  # the engine service alone: no tokenizer in its CPU split
    assert set(ids["extra"]["cpu_s_per_1k_tokens"]) == {"engine core", "engine front", "bench client"}
    core = report["extra"]["online"]["openmp"]["engine core"]  # read back from the core's /proc entry
    expected = dict(os.environ)
    apply_openmp_defaults(expected)  # what tokenwire-engine gives the core: the bounded spin, unless set here
    assert (core["GOMP_SPINCOUNT"], core["OMP_WAIT_POLICY"]) == (
        expected.get("GOMP_SPINCOUNT"),
        expected.get("OMP_WAIT_POLICY"),
    )
    assert int(core["threads"]) >= 1 and core["cpus_allowed"]


def test_the_report_warns_when_offline_and_the_core_waited_differently():
    spin = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": None, "OMP_NUM_THREADS": "2"}
    passive = dict(spin, OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT=None)
    placed = {"threads": "3", "cpus_allowed": "0-1"}
    same = {"engine": {"openmp": spin | placed}, "online": {"openmp": {"engine core": spin | {"threads": "5"}}}}
    lines = openmp_lines(same)
    assert (
        lines[0]
        == "openmp offline (this process): GOMP_SPINCOUNT=10000, OMP_NUM_THREADS=2, threads=3, cpus_allowed=0-1"
    )
    assert not any(line.startswith("warning") for line in lines)
    differ = {"engine": {"openmp": passive | placed}, "online": {"openmp": {"engine core": spin | placed}}}
    assert openmp_lines(differ)[-1].startswith("warning: offline and the served engine core ran under different")
    offline_only = openmp_lines({"engine": {"openmp": spin}})  # no served core: nothing to compare
    assert offline_only == ["openmp offline (this process): GOMP_SPINCOUNT=10000, OMP_NUM_THREADS=2"]


def test_online_mode_through_the_gateway_beside_the_sdk_in_one_run(tmp_path, tiny_llama_dir):
    """--endpoint grpc,openai,sse: the bench starts the gateway over the services it started, and the
    same requests go through the SDK, the openai client and raw SSE, one run each, compared."""
    report = run_bench(
        tmp_path,
        tiny_llama_dir,
        "--mode",
        "online",
        "--endpoint",
        "grpc,openai,sse",
        "--concurrency",
        "2",
        "--warmup-runs",
        "0",
    )
    check_mode(report, "online")
    assert report["extra"]["online"]["gateway_url"].startswith("http://127.0.0.1:")
    for mode in ("online_openai", "online_sse"):
        m = report["modes"][mode]
        assert (m["num_runs"], m["num_requests"], m["num_errors"]) == (1, N, 0)
        assert m["completion_tokens"] == N * NEW  # the engine's count, from the usage chunk
        assert m["prompt_tokens"] >= N * 8
        assert m["prompt_encodes"] == 0  # the gateway encoded through the tokenizer service
        assert m["ttft_ms"]["count"] == N and 0 < m["ttft_ms"]["p50"] <= m["e2e_ms"]["max"]
        assert m["extra"]["endpoint"] == mode.removeprefix("online_")
        assert report["comparisons"][f"{mode}_vs_online"] > 0
        assert f"{mode}_ttft_p50_overhead_ms" in report["comparisons"]


def test_an_unknown_endpoint_is_refused_naming_the_flag():
    with pytest.raises(SystemExit, match="--endpoint: unknown \\['http'\\]"):
        bench_cli.parse_endpoints("grpc,http")


def test_llamacpp_mode_needs_a_gguf_model_and_says_so(tmp_path, tiny_llama_dir):
    # The tiny model is a transformers folder: llama.cpp has no file to run, and the refusal names the need.
    with pytest.raises(SystemExit, match="--mode llamacpp needs a GGUF model"):
        run_bench(tmp_path, tiny_llama_dir, "--mode", "llamacpp")


def test_step_profile_breaks_a_decode_step_down(tiny_llama_dir, capsys):
    assert bench_profile.main(["--model", tiny_llama_dir, "--dtype", "float32", "--new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"P1: \d+ prompt tokens, 96 completion tokens in [\d.]+ s", out)
    for batch in (32, 1):
        decode = out[out.index(f"decode step, batch {batch}:") :]
        decode = decode[: decode.index("Self CPU time total")]
        for bucket in ("linear", "attention", "other ops", "python"):
            assert re.search(rf"  {bucket} +[\d.]+ ms +[\d.]+%", decode), (batch, bucket)
    assert re.search(r"ceiling, linear layers alone with F.linear: [\d.]+ tok/s", out)


def test_tokenwire_bench_runs_the_benchmark_in_its_own_process():
    """`tokenwire bench` (the SDK's CLI) hands over to tokenwire.bench without importing it."""
    run = subprocess.run(command("tokenwire") + ["bench", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--workload" in run.stdout


def test_multiprefix_workload_interleaves_distinct_system_prompts(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    spec = make_spec("multiprefix")
    assert (spec.num_requests, spec.num_prefixes, spec.shared_prefix_len) == (128, 8, 512)
    reqs = build_requests(make_spec("multiprefix", as_ids=True, num_requests=16), tokenizer)
    heads = [tuple(r.token_ids[:512]) for r in reqs]
    assert len(set(heads)) == 8 and all(heads[i] == heads[i % 8] for i in range(16))


def test_replica_counters_are_read_from_prometheus_text():
    text = (
        'tokenwire_engine_requests_finished_total{finish_reason="length"} 5.0\n'
        'tokenwire_engine_requests_finished_total{finish_reason="stop"} 2.0\n'
        "tokenwire_engine_prompt_tokens_total 700.0\ntokenwire_engine_cached_prompt_tokens_total 512.0\n"
        "tokenwire_engine_prompt_tokens_created 1.7e+09\n"
    )
    assert parse_counters(text) == Counters(7, 700, 512)


def test_multiprefix_compares_round_robin_prefix_affinity_and_one_replica(tmp_path, tiny_llama_dir):
    """Real engine replicas; one request at a time, so round robin visits every replica with each prefix
    while affinity keeps each prefix on one (bounded load never has to step in)."""
    out = tmp_path / "multiprefix.json"
    argv = [
        "--model",
        tiny_llama_dir,
        "--workload",
        "multiprefix",
        "--num-prefixes",
        "2",
        "--num-requests",
        "8",
        "--shared-prefix-len",
        "64",
        "--input-len-range",
        "4",
        "8",
        "--max-new-tokens",
        "2",
        "--concurrency",
        "1",
        "--pretok",
        "--warmup-runs",
        "0",
        "--no-progress",
        "--json",
        str(out),
    ]
    assert bench_cli.main(argv) == 0
    report = json.loads(out.read_text())
    setups = report["replicas"]["setups"]
    assert list(setups) == ["round_robin", "prefix", "single"]
    for name, setup in setups.items():
        assert report["modes"][name]["num_errors"] == 0 and setup["ttft_p50_ms"] > 0
        assert sum(setup["requests"].values()) == 8 and setup["max_over_mean"] >= 1
        assert 0 <= setup["prefix_cache_hit_rate"] <= 1 and setup["hit_rate"] == pytest.approx(
            setup["prefix_cache_hit_rate"]
        )  # the servers' counters agree with the usage the client saw
    assert (
        setups["round_robin"]["num_replicas"],
        setups["prefix"]["num_replicas"],
        setups["single"]["num_replicas"],
    ) == (3, 3, 1)
    assert setups["prefix"]["prefix_cache_hit_rate"] >= setups["round_robin"]["prefix_cache_hit_rate"]
    assert setups["single"]["prefix_cache_hit_rate"] > 0.5  # 6 of 8 requests find their prefix's 4 blocks
    comparisons = report["comparisons"]
    assert comparisons["prefix_hit_rate_vs_single"] > 0 and comparisons["prefix_max_over_mean_requests"] >= 1
    assert set(report["replicas"]["targets"]) == {
        "prefix_hit_rate_vs_single >= 0.9",
        "prefix_max_over_mean_requests <= 1.5",
    }


def test_model_impl_bench_runs_both_forwards_in_one_run(tiny_llama_dir):
    result = bench_model_impl.measure(tiny_llama_dir, "float32", "none", new_tokens=4, rounds=2)
    assert result["same_ids"]  # float32: the fallback decodes the native forward's ids
    assert set(result["ms_per_token"]) == {"native", "transformers"}
    assert all(len(v) == 2 and min(v) > 0 for v in result["ms_per_token"].values())
    assert result["fallback_over_native"] > 0 and result["quantization"] == "none"

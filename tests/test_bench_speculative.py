"""The copy workload and `--spec-compare` end to end on the tiny echo model: both engines run, the JSON holds
the acceptance rate and the TPOT ratio, greedy ids agree. No timing thresholds (a shared 2-core machine)."""

from __future__ import annotations

import json

from tokenwire.bench import cli as bench_cli
from tokenwire.bench.workloads import build_requests, make_spec
from transformers import AutoTokenizer


def test_copy_prompts_quote_their_passage_and_start_the_copy(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    requests = build_requests(make_spec("copy", num_requests=3), tokenizer)
    assert len({r.text for r in requests}) == 3  # no prefix shared between requests
    for r in requests:
        passage, started = r.text.split("Text: ")[1].split("\n\nRepeated: ")
        assert len(passage.split()) == 300 and passage.startswith(started) and len(started.split()) == 8


def test_spec_compare_reports_acceptance_and_tpot_ratio(echo_llama_dir, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--model", echo_llama_dir, "--workload", "copy", "--num-requests", "2", "--max-new-tokens", "12"]
    argv += ["--dtype", "float32", "--no-progress", "--json", str(out)]
    assert bench_cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"naive", "naive_spec"}
    for mode in ("naive", "naive_spec"):
        assert report["modes"][mode]["completion_tokens"] == 2 * 12
    c = report["comparisons"]
    assert c["naive_spec_draft_tokens"] > 0 and 0 < c["naive_spec_acceptance_rate"] <= 1
    assert c["naive_tpot_p50_off_over_spec"] > 0 and c["naive_spec_tok_s_vs_off"] > 0
    assert c["naive_spec_same_ids_as_off"] == 1.0  # greedy, fp32: speculation changes no token
    assert report["extra"]["engine"]["speculative"] == "ngram"

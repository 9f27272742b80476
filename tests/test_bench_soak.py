"""The memory soak benchmark end to end (`tokenwire-bench soak`): the real engine service started by the
shared launcher on the tiny model, 300 requests with cancels and deadlines, RSS sampled from both engine
processes. It checks the tool's accounting and end-state checks, not memory figures (those are
measured on the default model: `make bench-soak`)."""

from __future__ import annotations

import json

import pytest
from tokenwire.bench import cli as bench_cli

N, EVERY = 300, 100


def test_soak_counts_every_outcome_and_samples_both_engine_processes(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "soak.json"
    argv = [
        "soak",
        "--model",
        tiny_llama_dir,
        "--num-requests",
        str(N),
        "--concurrency",
        "16",
        "--sample-every",
        str(EVERY),
        "--warmup-requests",
        "32",
        "--deadline-s",
        "0.001",
        "0.02",
        "--json",
        str(out),
    ]
    assert bench_cli.main(argv) == 0
    report = json.loads(out.read_text())

    outcomes = report["outcomes"]
    assert outcomes["completed"] + outcomes["cancelled"] + outcomes["deadline_exceeded"] == N
    assert outcomes["cancelled"] > 0 and outcomes["deadline_exceeded"] > 0 and outcomes["completed"] > N / 2
    assert outcomes["errors"] == report["warmup_outcomes"]["errors"] == 0 and report["failures"] == []

    samples = report["samples"]
    assert [s["requests_done"] for s in samples] == list(range(0, N + 1, EVERY))
    assert all(s["front_bytes"] > 0 and s["core_bytes"] > 0 for s in samples)
    pids = report["pids"]
    assert pids["engine front"] != pids["engine core"]

    end = report["engine_end"]
    assert end["idle"] and (end["num_running"], end["num_waiting"], end["num_active_requests"]) == (0, 0, 0)
    assert end["num_free_kv_blocks"] == end["num_kv_blocks"] > 0
    assert end["prompt_encodes"] == 0
    assert report["engine_exit_code"] == 0

    summary = report["summary"]
    assert summary["half_at_requests"] == 100 and summary["end_at_requests"] == N
    core = summary["core"]
    assert core["steady_state_mib"] == core["at_end_mib"] == samples[-1]["core_bytes"] / 2**20
    assert core["growth_first_half_mib"] + core["growth_second_half_mib"] == pytest.approx(
        core["at_end_mib"] - core["after_warmup_mib"]
    )
    printed = capsys.readouterr().out
    assert "core+front MiB" in printed and "steady state" in printed


def test_soak_against_a_given_engine_needs_its_pid():
    with pytest.raises(SystemExit, match="--engine-pid"):  # the RSS it samples is that process's
        bench_cli.main(["soak", "--engine", "127.0.0.1:1"])

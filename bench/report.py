"""How benchmark results leave the process: the environment they were measured in, a terminal table,
a JSON file with every figure, a PNG with latency CDFs and throughput bars, and a progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from tokenwire.bench.metrics import Distribution, ModeSummary
from tokenwire.bench.proc_cpu import wait_policy

_PACKAGES = ("tokenwire", "torch", "transformers", "tokenizers", "numpy", "grpcio", "protobuf")


def cpu_busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores other processes keep busy right now (from /proc/stat over `seconds`; None where
    unavailable). Unlike the load average, it does not remember the previous benchmark that just ended."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(seconds)
    second = _cpu_times()
    total, idle = (b - a for a, b in zip(first, second))
    return (os.cpu_count() or 1) * (1 - idle / total) if total > 0 else None


def _cpu_times() -> tuple[int, int] | None:
    """(total, idle incl. iowait) jiffies of all CPUs."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]


def environment(dtype: str, device: str, busy_cores_before: float | None = None) -> dict:
    """What the numbers depend on: versions, CPU and its capability, threads, dtype, git revision, and
    how busy the machine was before the run (other processes on a 2-core machine distort every figure)."""
    flags = _cpu_flags()
    return {
        "busy_cores_before": busy_cores_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # this process (every process's: extra.*.openmp)
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "dtype": dtype,
        "device": device,
        "git_revision": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "argv": sys.argv,
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# ---- terminal ----


def format_table(summaries: list[ModeSummary], comparisons: dict) -> str:
    head = (
        f"{'mode':<14}{'runs':>5}{'reqs':>6}{'compl tok':>10}{'compl tok/s':>12}{'total tok/s':>12}"
        f"{'TTFT p50/p90/p99 ms':>24}{'TPOT p50/p90/p99 ms':>22}{'ITL p50/p99 ms':>16}"
        f"{'E2E p50/p99 ms':>18}{'hit':>6}{'enc':>5}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        lines.append(
            f"{s.mode:<14}{s.num_runs:>5}{s.num_requests:>6}{s.completion_tokens:>10}"
            f"{s.completion_tok_s:>12.1f}{s.total_tok_s:>12.1f} {_pcts(s.ttft_ms, 3):>23}"
            f" {_pcts(s.tpot_ms, 3):>21} {_pcts(s.itl_ms, 2):>15} {_pcts(s.e2e_ms, 2):>17}"
            f"{_fmt(s.prefix_cache_hit_rate, '.0%'):>6}{_fmt(s.prompt_encodes, 'd'):>5}"
        )
        if s.num_errors:
            lines.append(f"  {s.mode}: {s.num_errors} request(s) failed")
    for s in summaries:
        lines += _step_profile_lines(s)
    for s in summaries:
        lines += _cpu_lines(s)
    for name, value in comparisons.items():
        lines.append(f"{name:<40} {_fmt(value, '.3f')}")
    return "\n".join(lines)


def format_replicas_table(
    summaries: dict[str, ModeSummary], loads: dict[str, dict], targets: dict[str, bool | None]
) -> str:
    """The `replicas` mode's setups side by side: hit rate, TTFT p50, requests per replica, max/mean."""
    head = (
        f"{'setup':<13}{'replicas':>9}{'hit rate':>10}{'TTFT p50 ms':>13}  {'requests per replica':<24}{'max/mean':>9}"
    )
    lines = [head, "-" * len(head)]
    for setup, load in loads.items():
        s = summaries[setup]
        counts = " / ".join(str(n) for n in load["requests"].values())
        lines.append(
            f"{setup:<13}{load['num_replicas']:>9}{_fmt(s.prefix_cache_hit_rate, '.1%'):>10}"
            f"{_fmt(s.ttft_ms.p50, '.1f'):>13}  {counts:<24}{_fmt(load['max_over_mean'], '.2f'):>9}"
        )
    for name, met in targets.items():
        lines.append(f"target {name}: {'-' if met is None else 'met' if met else 'MISSED'}")
    return "\n".join(lines)


def _step_profile_lines(summary: ModeSummary) -> list[str]:
    """The engine's own per-phase step times (last run), for modes that drive the engine in-process."""
    profile = summary.extra.get("step_profile")
    if not profile:
        return []
    lines = []
    if summary.prompt_encodes:
        lines.append(
            f"{summary.mode} engine encodes: {summary.prompt_encodes} prompts in "
            f"{summary.extra.get('prompt_encode_s', 0.0) * 1e3:.1f} ms (inside the timed region)"
        )
    for kind in ("decode", "prefill"):
        times = profile[kind]
        if times["steps"]:
            total = sum(times["per_step"].values())
            phases = ", ".join(
                f"{name.removesuffix('_ms')} {ms:.1f} ms ({ms / total:.0%})" for name, ms in times["per_step"].items()
            )
            lines.append(f"{summary.mode} {kind} steps: {times['steps']}, {total:.1f} ms each = {phases}")
    return lines


def openmp_lines(extra: dict) -> list[str]:
    """How each process's OpenMP threads waited, and a warning when the in-process engine (offline) and
    the served engine core ran under different settings: their ratio then measures the settings too."""
    placements = {"offline (this process)": (extra.get("engine") or {}).get("openmp")}
    placements |= (extra.get("online") or {}).get("openmp") or {}
    lines = [
        f"openmp {name}: " + ", ".join(f"{k}={v}" for k, v in placement.items() if v is not None)
        for name, placement in placements.items()
        if placement is not None
    ]
    offline, core = placements["offline (this process)"], placements.get("engine core")
    if offline is not None and core is not None and wait_policy(offline) != wait_policy(core):
        lines.append(
            "warning: offline and the served engine core ran under different OpenMP settings "
            f"({wait_policy(offline)} vs {wait_policy(core)}): online/offline ratios compare those too"
        )
    return lines


def _cpu_lines(summary: ModeSummary) -> list[str]:
    """Online modes: CPU seconds per 1,000 completion tokens of each process (last run, from /proc)."""
    per_1k = summary.extra.get("cpu_s_per_1k_tokens")
    if not per_1k:
        return []
    parts = ", ".join(f"{name} {s:.2f}" for name, s in per_1k.items())
    return [f"{summary.mode} CPU s per 1k completion tokens: {parts}; total {sum(per_1k.values()):.2f}"]


def _pcts(d: Distribution, n: int) -> str:
    values = (d.p50, d.p90, d.p99) if n == 3 else (d.p50, d.p99)
    return "/".join(_fmt(v, ".1f") for v in values)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


# ---- files ----


def write_json(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_finite(report), indent=2, default=str, allow_nan=False))


def _finite(value):
    """JSON has no inf/nan: they become null (e.g. request_rate inf, "all at once")."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_plot(
    path: str,
    samples: dict[str, dict[str, list[float]]],
    throughput: dict[str, float],
    ceiling_tok_s: float | None,
    comparisons: dict,
    title: str,
) -> None:
    """Latency CDFs (TTFT, TPOT, ITL, E2E) per mode, completion tok/s bars against the ceiling, and the
    ratios as text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.ravel()
    for ax, metric in zip(axes, ("ttft", "tpot", "itl", "e2e")):
        for mode, values in samples.items():
            data = np.sort(values.get(metric, []))
            if len(data):  # an empirical CDF: a step up of 1/n at every sample, from 0
                ax.step(
                    np.r_[data[0], data], np.r_[0, np.arange(1, len(data) + 1) / len(data)], where="post", label=mode
                )
        ax.set(title=f"{metric.upper()} CDF", xlabel="ms", ylabel="fraction", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    bars = axes[4]
    names = list(throughput)
    bars.bar(names, [throughput[n] for n in names], color="tab:blue")
    if ceiling_tok_s:
        bars.axhline(ceiling_tok_s, color="tab:red", linestyle="--", label=f"ceiling {ceiling_tok_s:.0f}")
        bars.legend(fontsize=8)
    bars.set(title="completion tok/s", ylabel="tok/s")
    bars.tick_params(axis="x", labelrotation=20)
    axes[5].axis("off")
    axes[5].text(
        0,
        1,
        "\n".join(f"{k}: {_fmt(v, '.3f')}" for k, v in comparisons.items()),
        va="top",
        family="monospace",
        fontsize=9,
    )
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr counting finished requests (a no-op object when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False, file=sys.stderr)

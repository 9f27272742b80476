"""What the memory soak (soak.py) measures and reports: RSS samples of the engine front and core, the
table printed as they come, the summary (after the warm-up, at N/2, at N, the growth over each half, the
steady state), outcomes, the engine's end state, and the JSON. Memory is in MiB (2^20 bytes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tokenwire.bench.proc_cpu import rss_bytes
from tokenwire.bench.report import environment, write_json

if TYPE_CHECKING:
    from tokenwire.bench.soak import SoakResult

_MIB = float(1 << 20)
PROCESSES = {"front": lambda s: s.front_bytes, "core": lambda s: s.core_bytes, "core+front": lambda s: s.total_bytes}
_COLUMNS = f"{'requests':>9} {'elapsed s':>10} {'front MiB':>10} {'core MiB':>10} {'core+front MiB':>15}"


@dataclass(frozen=True)
class RssSample:
    requests_done: int  # counted after the warm-up
    elapsed_s: float
    front_bytes: int
    core_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.front_bytes + self.core_bytes


class RssSampler:
    """RSS of the engine front and core every `sample_every` requests (the final one is taken apart,
    once the engine is idle); each sample is handed to `show` as it is taken."""

    def __init__(self, pids: dict[str, int], sample_every: int, num_requests: int, show: Callable[[RssSample], None]):
        self.pids, self.sample_every, self.num_requests, self.show = pids, sample_every, num_requests, show
        self.samples: list[RssSample] = []
        self.start = time.perf_counter()

    def after_request(self, done: int) -> None:
        if done % self.sample_every == 0 and done < self.num_requests:
            self.take(done)

    def take(self, done: int) -> None:
        sample = RssSample(done, time.perf_counter() - self.start, self._rss("engine front"), self._rss("engine core"))
        self.samples.append(sample)
        self.show(sample)

    def _rss(self, name: str) -> int:
        value = rss_bytes(self.pids[name])
        if value is None:
            raise RuntimeError(f"the {name} process ({self.pids[name]}) is gone")
        return value


def table_header() -> str:
    return "RSS of the engine service's processes (0 requests: after the warm-up)\n" + _COLUMNS


def table_row(s: RssSample) -> str:
    return (
        f"{s.requests_done:>9} {s.elapsed_s:>10.1f} {s.front_bytes / _MIB:>10.1f} {s.core_bytes / _MIB:>10.1f} "
        f"{s.total_bytes / _MIB:>15.1f}"
    )


def rss_summary(samples: list[RssSample], num_requests: int) -> dict:
    """Per process, MiB: after the warm-up (the first sample), at N/2 (the last sample at or before it),
    at N (the last, taken with the engine idle), the growth over each half, and the steady state."""
    first, last = samples[0], samples[-1]
    half = max((s for s in samples if s.requests_done <= num_requests // 2), key=lambda s: s.requests_done)
    out: dict = {"half_at_requests": half.requests_done, "end_at_requests": last.requests_done}
    for name, value in PROCESSES.items():
        start, middle, end = (value(s) / _MIB for s in (first, half, last))
        out[name] = {
            "after_warmup_mib": start,
            "at_half_mib": middle,
            "at_end_mib": end,
            "growth_first_half_mib": middle - start,
            "growth_second_half_mib": end - middle,
            "steady_state_mib": end,
        }
    return out


def summary_text(result: SoakResult) -> str:
    n = result.config.num_requests
    rss = rss_summary(result.samples, n)
    lines = [
        f"\nsoak: {n} requests ({result.config.warmup_requests} warm-up before) in {result.duration_s:.1f} s, "
        f"{result.config.concurrency} in flight, on {result.engine_info['model']} "
        f"({result.engine_info['dtype']}, {result.engine_info['device']})",
        f"{'RSS MiB':<11} {'after warm-up':>13} {'at ' + str(rss['half_at_requests']):>10} "
        f"{'at ' + str(rss['end_at_requests']):>10} {'growth 1st half':>16} {'growth 2nd half':>16} "
        f"{'steady state':>13}",
    ]
    for name in PROCESSES:
        r = rss[name]
        lines.append(
            f"{name:<11} {r['after_warmup_mib']:>13.1f} {r['at_half_mib']:>10.1f} {r['at_end_mib']:>10.1f} "
            f"{r['growth_first_half_mib']:>+16.1f} {r['growth_second_half_mib']:>+16.1f} "
            f"{r['steady_state_mib']:>13.1f}"
        )
    o, e = result.outcomes, result.engine_end
    lines += [
        f"outcomes: {o.completed} completed, {o.cancelled} cancelled, {o.deadline_exceeded} deadline exceeded, "
        f"{o.errors} other errors{' ' + str(o.error_examples) if o.errors else ''} "
        f"(warm-up: {result.warmup.errors} errors)",
        f"engine at the end: {e.num_running} running, {e.num_waiting} waiting, {e.num_active_requests} active, "
        f"{e.num_free_kv_blocks}/{e.num_kv_blocks} KV blocks free, {e.prompt_encodes} prompt encodes; "
        f"exit code {result.engine_exit_code if result.engine_exit_code is not None else 'n/a (not started here)'}",
    ]
    return "\n".join(lines)


def write(path: str, result: SoakResult, busy_cores_before: float | None) -> None:
    write_json(
        path,
        {
            "config": asdict(result.config),
            "engine": result.engine_info,
            "pids": result.pids,
            "samples": [asdict(s) | {"total_bytes": s.total_bytes} for s in result.samples],
            "summary": rss_summary(result.samples, result.config.num_requests),
            "duration_s": result.duration_s,
            "warmup_outcomes": asdict(result.warmup),
            "outcomes": asdict(result.outcomes),
            "engine_end": asdict(result.engine_end) | {"idle": result.engine_end.idle},
            "engine_exit_code": result.engine_exit_code,
            "failures": result.failures(),
            "environment": environment(result.engine_info["dtype"], result.engine_info["device"], busy_cores_before),
        },
    )

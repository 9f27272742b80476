"""CPU seconds and resident memory per process, read from /proc (Linux): the share of the machine each
part of the serving path costs. On a 2-core machine the serving layer taking one core shows here, not in
tok/s alone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of every thread of `pid` so far; None if it is gone (or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (fields 14 and 15)


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` now (VmRSS), in bytes; None if it is gone (or not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # "VmRSS:  123456 kB"
    return None  # a zombie has no VmRSS line


def children(pid: int, cmdline_contains: str = "") -> list[int]:
    """Direct children of `pid` (those whose command line contains `cmdline_contains`)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(p) for p in task.read_text().split()]
        except OSError:
            continue
    return [p for p in out if cmdline_contains in _cmdline(p)]


def engine_core_pid(engine_pid: int) -> int | None:
    """The engine core process of an engine service (multiprocessing's spawned child), if it has one."""
    found = children(engine_pid, "spawn_main")
    return found[0] if found else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class CpuMeter:
    """Snapshots of named processes' CPU seconds; `delta` gives each one's seconds since `start`."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self._start: dict[str, float | None] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def delta(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            now, before = cpu_seconds(pid), self._start.get(name)
            if now is not None and before is not None:
                out[name] = now - before
        return out


def per_1k_tokens(cpu_s: dict[str, float], completion_tokens: int) -> dict[str, float]:
    return {name: s * 1000.0 / max(completion_tokens, 1) for name, s in cpu_s.items()}


_OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


def openmp_placement(pid: int, environ: Mapping[str, str] | None = None) -> dict[str, str | None] | None:
    """How `pid`'s OpenMP threads wait and where they may run: the OMP_* / GOMP_* variables it started
    with (or `environ`, for this process, whose later changes /proc does not show), its thread count
    and its CPU affinity (None if it is gone, or not Linux)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        variables = environ if environ is not None else _environ(pid)
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        **{name: variables.get(name) for name in _OPENMP_VARIABLES},
        "threads": fields.get("Threads", "").strip() or None,
        "cpus_allowed": fields.get("Cpus_allowed_list", "").strip() or None,
    }


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def wait_policy(placement: dict[str, str | None] | None) -> tuple[str | None, ...] | None:
    """The part of a placement that decides how its threads wait and how many there are."""
    return None if placement is None else tuple(placement[name] for name in _OPENMP_VARIABLES)

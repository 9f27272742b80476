"""How the engine core's OpenMP threads wait, and how many there are: chosen before torch loads libgomp.

No torch here: the engine's CLI applies these defaults to the environment the core process inherits,
and libgomp reads it once, when torch loads it. An operator's own OMP_* / GOMP_* variables always win.

Waiting: a decode step is hundreds of short parallel regions separated by a little serial Python. A
thread that sleeps as soon as a region ends (OMP_WAIT_POLICY=PASSIVE) pays a futex sleep and wake-up
on every gap; on an AMX machine, where the regions are shortest, that was a third of the step. A thread
that spins forever (ACTIVE) takes the core from anything else that needs it. So the default is a
bounded spin: spin through the gaps inside a step, sleep through the long waits between requests
(docs/benchmarks.md, "OpenMP waits").

Threads: libgomp starts one thread per CPU in the affinity mask, but a container's CPU quota (cgroup
`cpu.max`, what a Kubernetes CPU limit sets) is not in that mask: on a 64-core node with a 2-CPU limit,
64 threads would time-slice on 2 CPUs' worth of quota.
"""

from __future__ import annotations

import math
import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

# Spin iterations before a waiting thread sleeps (libgomp's unit: one `pause` each; 28 ns on the AVX2-only
# EPYC, so 1000 is 28 us). That covers the gaps between a decode step's ops and sleeps through the waits
# between steps. One stream is where it shows: on the AVX2-only EPYC (a VM, whose wake-ups are slow) 300
# made a token in 23.4 ms and PASSIVE in 26.0, 1000 in 9.7. Longer spins lose when another process
# shares the cores: 100000 made 40 tok/s where PASSIVE made 106 on the AMX Xeon; with one core busy 1000
# lost 12% online against PASSIVE on the AVX-512 EPYC and 19% on one stream against 300 on the AVX2 one,
# where batches moved under 8% either way (docs/benchmarks.md, "OpenMP waits"). A crowded host sets
# OMP_WAIT_POLICY=PASSIVE.
DEFAULT_SPIN_COUNT = 1000
_OPERATOR_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2; "max 100000" when there is no quota


@dataclass(frozen=True)
class OpenMPSettings:
    """What the core's OpenMP runtime will read, and who chose it (for the log and the benchmark)."""

    wait_policy: str | None
    spin_count: str | None
    num_threads: str
    chosen_by: str  # "operator" when any variable was set before us, else "tokenwire"


def apply_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> OpenMPSettings:
    """A bounded spin and a thread count from the cores this process may use, for whatever the
    operator has not set. Must run before torch is imported in the process whose environment it is."""
    chosen_by = "operator" if any(v in environ for v in (*_OPERATOR_WAIT_VARIABLES, "OMP_NUM_THREADS")) else "tokenwire"
    if not any(v in environ for v in _OPERATOR_WAIT_VARIABLES):
        environ["GOMP_SPINCOUNT"] = str(DEFAULT_SPIN_COUNT)
    environ.setdefault("OMP_NUM_THREADS", str(usable_cores()))
    return OpenMPSettings(
        environ.get("OMP_WAIT_POLICY"), environ.get("GOMP_SPINCOUNT"), environ["OMP_NUM_THREADS"], chosen_by
    )


def usable_cores(cpu_max: Path = _CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on (affinity mask), capped by its cgroup's CPU quota, rounded up."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_quota_cores(_read(cpu_max))
    return max(1, min(cores, quota) if quota is not None else cores)


def cgroup_quota_cores(cpu_max: str | None) -> int | None:
    """`cpu.max` ("QUOTA PERIOD", or "max PERIOD") -> the quota in whole CPUs, rounded up; None: no quota."""
    fields = (cpu_max or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None

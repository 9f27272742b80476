"""The benchmark's entry point: the engine service's OpenMP defaults first, then the benchmark.

libgomp reads its environment once, when torch loads it, so this runs before anything imports torch.
The in-process engine (offline) then waits and threads as the served engine core does, and the
services started here inherit the same settings; an operator's own OMP_* / GOMP_* variables still win.
"""

from __future__ import annotations

from tokenwire.engine.core.openmp import apply_openmp_defaults


def main(argv: list[str] | None = None) -> int:
    apply_openmp_defaults()
    from tokenwire.bench.cli import main as run

    return run(argv)

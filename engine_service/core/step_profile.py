"""Where the engine's step time goes, measured in the real loop: cumulative wall time of each phase of
`LLMEngine.step` (schedule, forward, sample, post-process), split into decode-only steps and steps that
carry prefill chunks. Five `perf_counter` calls per step (a `StepClock`'s marks); no profiler, no
synchronisation of its own.

On CUDA the forward is asynchronous, so its time shows up in `sample` (the one `.tolist()` per step that
waits for the device); on CPU each phase is what it says.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class PhaseTimes:
    steps: int = 0
    schedule_s: float = 0.0  # scheduler.schedule(): picking the batch, allocating blocks
    forward_s: float = 0.0  # block copies + model runner (input packing, forward, logits)
    sample_s: float = 0.0  # sampler, incl. the device -> host copy of the sampled ids
    postprocess_s: float = 0.0  # scheduler bookkeeping, stop checks, detokenizing, outputs

    def minus(self, other: PhaseTimes) -> PhaseTimes:
        return PhaseTimes(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def per_step_ms(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {
            f.name.removesuffix("_s") + "_ms": getattr(self, f.name) * 1e3 / n
            for f in fields(self)
            if f.name != "steps"
        }


class StepClock:
    """The times of one step's phase ends, from its start: `mark()` after each phase."""

    __slots__ = ("marks",)

    def __init__(self):
        self.marks = [time.perf_counter()]

    def mark(self) -> None:
        self.marks.append(time.perf_counter())


@dataclass
class StepProfile:
    decode: PhaseTimes = field(default_factory=PhaseTimes)  # every chunk is one decode token
    prefill: PhaseTimes = field(default_factory=PhaseTimes)  # at least one prompt chunk in the batch

    @staticmethod
    def clock() -> StepClock:
        return StepClock()

    def add(self, has_prefill: bool, clock: StepClock) -> None:
        """Count one step whose clock holds its start and the end of each of the four phases."""
        start, scheduled, forwarded, sampled, end = clock.marks
        times = self.prefill if has_prefill else self.decode
        times.steps += 1
        times.schedule_s += scheduled - start
        times.forward_s += forwarded - scheduled
        times.sample_s += sampled - forwarded
        times.postprocess_s += end - sampled

    def snapshot(self) -> StepProfile:
        return StepProfile(PhaseTimes(**asdict(self.decode)), PhaseTimes(**asdict(self.prefill)))

    def minus(self, other: StepProfile) -> StepProfile:
        return StepProfile(self.decode.minus(other.decode), self.prefill.minus(other.prefill))

    def to_dict(self) -> dict:
        return {
            kind: asdict(times) | {"per_step": times.per_step_ms()}
            for kind, times in (("decode", self.decode), ("prefill", self.prefill))
        }

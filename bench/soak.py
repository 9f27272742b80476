"""The engine service's memory soak: many requests of varying shape through the real engine service,
with the resident memory (RSS) of both its processes, the gRPC front and the engine core it spawns,
sampled as they go. Caches keyed by batch shape (oneDNN kernels, allocator pools) show as RSS that keeps
growing; caches keyed by a bounded set of shapes show as a plateau.

    python -m tokenwire.bench.soak [--model smollm2-135m] [--num-requests 20000] [--json soak.json]
    tokenwire-bench soak ...        (the same)

Requests: random token-id prompts of 8-64 ids, 1-8 new tokens (eos ignored), half greedy and half
sampled, `--concurrency` in flight; about 10% cancelled by the client mid-stream and about 15% given a
short random deadline; everything seeded. A warm-up of `--warmup-requests` comes first and is not
counted. The engine is started here by the shared launcher (exactly as deployed) unless `--engine ADDR
--engine-pid PID` name a running one. At the end the engine must be idle (nothing running, waiting or
active, every KV block free) and have encoded no prompt; any outcome other than completed, cancelled or
deadline exceeded, or a failed check, exits 1. Samples and report: soak_report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice

import grpc
from tokenwire.bench import soak_report
from tokenwire.bench.online import ids_request
from tokenwire.bench.proc_cpu import engine_core_pid
from tokenwire.bench.report import cpu_busy_cores
from tokenwire.bench.soak_report import RssSample, RssSampler
from tokenwire.bench.workloads import BenchRequest
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.serving.launcher import ENGINE, start_service
from tokenwire.serving.model_resolver import DEFAULT_MODEL
from tokenwire.v1 import engine_pb2, engine_pb2_grpc

COMPLETED, CANCELLED, DEADLINE_EXCEEDED = "completed", "cancelled", "deadline_exceeded"
_MAX_ERROR_EXAMPLES = 10
_IDLE_POLL_S = 0.02


@dataclass(frozen=True)
class SoakConfig:
    num_requests: int = 20_000
    warmup_requests: int = 200
    concurrency: int = 64
    sample_every: int = 1000
    prompt_len: tuple[int, int] = (8, 64)  # ids, uniform, inclusive
    max_new_tokens: tuple[int, int] = (1, 8)  # uniform, inclusive; eos ignored
    cancel_rate: float = 0.10  # cancelled by the client mid-stream
    deadline_rate: float = 0.15  # given a short random deadline
    deadline_s: tuple[float, float] = (0.005, 0.5)
    request_timeout_s: float = 300.0  # every other request: a hang fails, never stalls the soak
    idle_timeout_s: float = 30.0  # for the engine to settle the last cancels
    seed: int = 0


@dataclass(frozen=True)
class Plan:
    request: BenchRequest
    params: SamplingParams
    cancel_after: int | None  # cancel once this many tokens arrived (0: right after sending)
    deadline_s: float | None


@dataclass
class Outcomes:
    completed: int = 0
    cancelled: int = 0
    deadline_exceeded: int = 0
    errors: int = 0  # anything else: a failure of the soak
    error_examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.completed + self.cancelled + self.deadline_exceeded + self.errors

    def add(self, outcome: str) -> None:
        if outcome in (COMPLETED, CANCELLED, DEADLINE_EXCEEDED):
            setattr(self, outcome, getattr(self, outcome) + 1)
            return
        self.errors += 1
        if len(self.error_examples) < _MAX_ERROR_EXAMPLES:
            self.error_examples.append(outcome)


@dataclass(frozen=True)
class EngineEnd:
    """The engine's statistics once the soak settled."""

    num_running: int
    num_waiting: int
    num_active_requests: int
    num_free_kv_blocks: int
    num_kv_blocks: int
    prompt_encodes: int  # during the soak (warm-up included)

    @property
    def idle(self) -> bool:
        return (
            self.num_running == self.num_waiting == self.num_active_requests == 0
            and self.num_free_kv_blocks == self.num_kv_blocks
        )


@dataclass
class SoakResult:
    config: SoakConfig
    engine_info: dict  # model, architecture and the engine configuration in force
    pids: dict[str, int]  # "engine front", "engine core"
    warmup: Outcomes
    outcomes: Outcomes
    samples: list[RssSample]
    engine_end: EngineEnd
    duration_s: float
    engine_exit_code: int | None = None  # when started here: its exit after the SIGTERM drain

    def failures(self) -> list[str]:
        out = []
        if self.warmup.errors or self.outcomes.errors:
            out.append(
                f"{self.warmup.errors + self.outcomes.errors} requests failed otherwise than by "
                f"their planned cancel or deadline: {self.warmup.error_examples + self.outcomes.error_examples}"
            )
        if not self.engine_end.idle:
            out.append(f"engine not idle at the end: {self.engine_end}")
        if self.engine_end.prompt_encodes:
            out.append(f"the engine encoded {self.engine_end.prompt_encodes} prompts (ids only were sent)")
        if self.engine_exit_code not in (None, 0):
            out.append(f"the engine exited with {self.engine_exit_code} after SIGTERM")
        return out


def plan_requests(config: SoakConfig, vocab_size: int) -> Iterator[Plan]:
    """An endless seeded stream of plans; the same seed gives the same plans in the same order."""
    rng = random.Random(config.seed)
    for index in range(sys.maxsize):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(*config.prompt_len))]
        new_tokens = rng.randint(*config.max_new_tokens)
        greedy = rng.random() < 0.5
        params = SamplingParams(
            max_new_tokens=new_tokens,
            temperature=0.0 if greedy else 0.8,
            top_p=0.95,
            ignore_eos=True,
            seed=None if greedy else config.seed + index,
        )
        roll = rng.random()  # one roll: a request is cancelled, or has a deadline, or neither
        cancel = rng.randint(0, new_tokens - 1) if roll < config.cancel_rate else None
        deadline = rng.uniform(*config.deadline_s) if 0 <= roll - config.cancel_rate < config.deadline_rate else None
        yield Plan(BenchRequest(None, ids, new_tokens), params, cancel, deadline)


async def run_one(stub, plan: Plan, request_timeout_s: float) -> str:
    """One streamed Generate, cancelled or bounded as planned; its outcome (or an error description)."""
    call = stub.Generate(ids_request(plan.request, plan.params), timeout=plan.deadline_s or request_timeout_s)
    tokens = 0
    try:
        if plan.cancel_after == 0:
            call.cancel()
        async for response in call:
            tokens += len(response.token_ids)
            if plan.cancel_after is not None and tokens >= plan.cancel_after:
                call.cancel()
        return COMPLETED
    except asyncio.CancelledError:  # grpc.aio raises this on reading a call we cancelled ourselves
        if plan.cancel_after is None:
            raise
        return CANCELLED
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and plan.deadline_s is not None:
            return DEADLINE_EXCEEDED
        if error.code() == grpc.StatusCode.CANCELLED and plan.cancel_after is not None:
            return CANCELLED
        return f"{error.code().name}: {error.details()}"


async def drive(
    stub, plans: Iterator[Plan], config: SoakConfig, after_each: Callable[[int], None] = lambda done: None
) -> Outcomes:
    """Every plan, `concurrency` at a time; `after_each(requests done)` runs as each one ends."""
    outcomes = Outcomes()

    async def worker() -> None:
        for plan in plans:  # one shared iterator: each plan goes to exactly one worker
            outcomes.add(await run_one(stub, plan, config.request_timeout_s))
            after_each(outcomes.total)

    await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    return outcomes


async def wait_idle(stub, encodes_before: int, timeout_s: float) -> EngineEnd:
    """The engine's end state, polled until idle or `timeout_s`: a cancel or an expired deadline reaches
    the engine core a step after the client saw its call end, and the engine offers nothing to wait on."""
    give_up = time.monotonic() + timeout_s
    while True:
        s = (await stub.GetModelInfo(engine_pb2.GetModelInfoRequest())).stats
        end = EngineEnd(
            s.num_running,
            s.num_waiting,
            s.num_active_requests,
            s.num_free_kv_blocks,
            s.num_kv_blocks,
            s.num_prompt_encodes - encodes_before,
        )
        if end.idle or time.monotonic() > give_up:
            return end
        await asyncio.sleep(_IDLE_POLL_S)


async def run_soak(
    address: str, front_pid: int, config: SoakConfig, show: Callable[[RssSample], None] = lambda sample: None
) -> SoakResult:
    """The warm-up, the first sample, the soak sampled as it goes, then the idle engine's last sample."""
    core_pid = engine_core_pid(front_pid)
    if core_pid is None:
        raise RuntimeError(f"process {front_pid} has no engine core child: is it a tokenwire-engine?")
    pids = {"engine front": front_pid, "engine core": core_pid}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = engine_pb2_grpc.EngineServiceStub(channel)
        info = await stub.GetModelInfo(engine_pb2.GetModelInfoRequest())
        plans = plan_requests(config, info.vocab_size)
        warmup = await drive(stub, islice(plans, config.warmup_requests), config)
        sampler = RssSampler(pids, config.sample_every, config.num_requests, show)
        sampler.take(0)
        outcomes = await drive(stub, islice(plans, config.num_requests), config, sampler.after_request)
        duration_s = time.perf_counter() - sampler.start
        engine_end = await wait_idle(stub, info.stats.num_prompt_encodes, config.idle_timeout_s)
        sampler.take(config.num_requests)
    engine_info = {
        "model": info.model,
        "architecture": info.architecture,
        "device": info.config.device,
        "dtype": info.config.dtype,
        "max_num_seqs": info.config.max_num_seqs,
        "max_num_batched_tokens": info.config.max_num_batched_tokens,
        "num_kv_blocks": info.config.num_kv_blocks,
        "block_size": info.config.block_size,
    }
    return SoakResult(config, engine_info, pids, warmup, outcomes, sampler.samples, engine_end, duration_s)


def soak_engine(args: argparse.Namespace, config: SoakConfig, show: Callable[[RssSample], None]) -> SoakResult:
    """The soak against `--engine`, or against an engine service started here and drained after."""
    if args.engine:
        return asyncio.run(run_soak(args.engine, args.engine_pid, config, show))
    flags = [
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--seed",
        str(config.seed),
        "--log-level",
        "WARNING",
    ]
    with start_service(ENGINE, flags) as engine:
        try:
            engine.wait_serving()
            result = asyncio.run(run_soak(engine.address, engine.process.pid, config, show))
        except BaseException:
            print(f"engine log ({engine.log_path}):\n{engine.log_tail()}", file=sys.stderr)
            raise
    return replace(result, engine_exit_code=engine.process.returncode)


def build_parser() -> argparse.ArgumentParser:
    defaults = SoakConfig()
    p = argparse.ArgumentParser(
        prog="tokenwire-bench soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the engine's --model (a resolver name or a folder)")
    p.add_argument("--dtype", default="auto", help="the engine's --dtype")
    p.add_argument("--device", default="auto", help="the engine's --device")
    p.add_argument("--engine", help="host:port of a running engine service (default: start one)")
    p.add_argument(
        "--engine-pid", type=int, help="with --engine: its front process, whose RSS (and its core's) is sampled"
    )
    p.add_argument(
        "--num-requests", type=int, default=defaults.num_requests, help="requests soaked (after the warm-up)"
    )
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=defaults.warmup_requests,
        help="requests before the first sample, not counted",
    )
    p.add_argument("--concurrency", type=int, default=defaults.concurrency, help="requests in flight")
    p.add_argument("--sample-every", type=int, default=defaults.sample_every, help="requests between RSS samples")
    p.add_argument(
        "--deadline-s",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=list(defaults.deadline_s),
        help="the short deadlines, uniform",
    )
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help="seeds prompts, shapes, cancels, deadlines, sampling"
    )
    p.add_argument("--json", dest="json_out", help="write the samples, the summary and the checks here")
    return p


def config_from(args: argparse.Namespace) -> SoakConfig:
    if args.engine and args.engine_pid is None:
        raise SystemExit("--engine needs --engine-pid: the soak samples that process's RSS and its core's")
    if min(args.num_requests, args.concurrency, args.sample_every) < 1 or args.warmup_requests < 0:
        raise SystemExit("--num-requests, --concurrency and --sample-every must be >= 1, --warmup-requests >= 0")
    return SoakConfig(
        num_requests=args.num_requests,
        warmup_requests=args.warmup_requests,
        concurrency=args.concurrency,
        sample_every=args.sample_every,
        deadline_s=tuple(args.deadline_s),
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from(args)
    busy_before = cpu_busy_cores()  # other processes' load distorts the figures: recorded
    print(soak_report.table_header(), flush=True)
    result = soak_engine(args, config, show=lambda sample: print(soak_report.table_row(sample), flush=True))
    print(soak_report.summary_text(result))
    if args.json_out:
        soak_report.write(args.json_out, result, busy_before)
    for failure in result.failures():
        print(f"soak FAILED: {failure}", file=sys.stderr)
    return 1 if result.failures() else 0


if __name__ == "__main__":
    raise SystemExit(main())

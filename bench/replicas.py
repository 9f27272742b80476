"""The benchmark's `replicas` mode (the `multiprefix` workload's default): the same shared-prefix traffic
through the SDK to engine replicas started here, under three setups, side by side in one run:

  round_robin  every replica, gRPC's round robin (the SDK's default);
  prefix       every replica, `routing="prefix"` (rendezvous hashing of the prompt's first blocks);
  single       the first replica alone: the hit rate one shared cache would give.

Every replica is a real `tokenwire-engine` process (the shared launcher), with its Prometheus endpoint
on: the requests each one finished and its prompt / cached prompt tokens are read before and after
every timed run, so the per-replica counts are the servers' own, whatever balanced the calls. Each setup
gets prompts of its own (a different variant), so no setup finds another's prefixes in a cache.
"""

from __future__ import annotations

import contextlib
import re
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from tokenwire.bench import online as bench_online
from tokenwire.bench.metrics import RunRecord
from tokenwire.bench.workloads import BenchRequest
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.serving.launcher import ENGINE, TOKENIZER, free_port, start_service

SETUPS = ("round_robin", "prefix", "single")
# Issue 19's targets: affinity keeps >= 0.9x the one-replica hit rate; no replica above 1.5x the mean.
TARGET_HIT_RATE_VS_SINGLE = 0.9
TARGET_MAX_OVER_MEAN = 1.5
_COUNTERS = {
    "requests": "tokenwire_engine_requests_finished_total",
    "prompt_tokens": "tokenwire_engine_prompt_tokens_total",
    "cached_prompt_tokens": "tokenwire_engine_cached_prompt_tokens_total",
}


@dataclass(frozen=True)
class Counters:
    """A replica's cumulative request and prompt-token counters (from its /metrics)."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.requests - other.requests,
            self.prompt_tokens - other.prompt_tokens,
            self.cached_prompt_tokens - other.cached_prompt_tokens,
        )


def parse_counters(text: str) -> Counters:
    """Sums each counter's samples (requests_finished has one per finish reason) in Prometheus text."""
    totals = dict.fromkeys(_COUNTERS, 0.0)
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", line)
        for field, name in _COUNTERS.items():
            if match and match.group(1) == name:
                totals[field] += float(match.group(2))
    return Counters(**{k: int(v) for k, v in totals.items()})


@dataclass(frozen=True)
class Replica:
    address: str  # host:port of its gRPC server
    metrics_url: str  # its Prometheus endpoint

    def counters(self) -> Counters:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            return parse_counters(response.read().decode())


@dataclass(frozen=True)
class SetupLoad:
    """How one setup's timed run spread over the replicas it used, from the servers' counters."""

    setup: str
    num_replicas: int
    requests: dict[str, int]  # per replica address
    hit_rates: dict[str, float | None]  # per replica: cached prompt tokens / prompt tokens
    hit_rate: float | None  # all replicas together
    max_over_mean: float | None  # most requests on one replica / the mean per replica

    @classmethod
    def of(cls, setup: str, deltas: dict[str, Counters]) -> SetupLoad:
        counts = {a: d.requests for a, d in deltas.items()}
        prompt = sum(d.prompt_tokens for d in deltas.values())
        mean = sum(counts.values()) / len(counts) if counts else 0
        rates = {a: _ratio(d.cached_prompt_tokens, d.prompt_tokens) for a, d in deltas.items()}
        return cls(
            setup,
            len(deltas),
            counts,
            rates,
            _ratio(sum(d.cached_prompt_tokens for d in deltas.values()), prompt),
            max(counts.values()) / mean if mean else None,
        )


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


class Cluster:
    """Engine replicas (and a tokenizer, unless prompts go as ids) running for the whole benchmark."""

    def __init__(self, replicas: list[Replica], tokenizer_addr: str | None):
        self.replicas, self.tokenizer_addr = replicas, tokenizer_addr

    def used_by(self, setup: str) -> list[Replica]:
        return self.replicas[:1] if setup == "single" else self.replicas

    def client(self, setup: str) -> bench_online.OnlineClient:
        """The SDK as a user would point it at the replicas: one multi-address target."""
        addresses = [r.address for r in self.used_by(setup)]
        target = addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)
        return bench_online.OnlineClient(target, self.tokenizer_addr, "prefix" if setup == "prefix" else "round_robin")

    def snapshot(self, setup: str) -> dict[str, Counters]:
        return {r.address: r.counters() for r in self.used_by(setup)}

    def describe(self) -> dict:
        return {"replicas": [asdict(r) for r in self.replicas], "tokenizer_addr": self.tokenizer_addr}


@contextlib.contextmanager
def cluster(args, model_dir: str, num_replicas: int) -> Iterator[Cluster]:
    """`num_replicas` engines started together (they load in parallel), SERVING on entry, drained on exit."""
    if num_replicas < 1:
        raise ValueError(f"replicas: must be >= 1, got {num_replicas}")
    with contextlib.ExitStack() as stack:
        services, replicas = [], []
        for _ in range(num_replicas):
            port = free_port()
            flags = bench_online._engine_flags(args, model_dir) + ["--metrics-port", str(port)]
            services.append(stack.enter_context(start_service(ENGINE, flags)))
            replicas.append(Replica(services[-1].address, f"http://127.0.0.1:{port}/metrics"))
        tokenizer = None
        if not args.pretok and args.tokenizer_addr is None:
            tokenizer = stack.enter_context(start_service(TOKENIZER, ["--model", model_dir]))
            services.append(tokenizer)
        # Runs first on exit: every process drains at once, before the stack waits for each in turn.
        stack.callback(lambda: [s.process.send_signal(signal.SIGTERM) for s in services if s.process.poll() is None])
        for service in services:
            service.wait_serving()
        yield Cluster(replicas, args.tokenizer_addr or (tokenizer.address if tokenizer else None))


def run(
    cluster_: Cluster,
    setup: str,
    requests: list[BenchRequest],
    params: list[SamplingParams],
    rate: float,
    concurrency: int | None,
    seed: int,
    progress=None,
) -> RunRecord:
    """One run of `setup`; its record carries the replicas' load (counter deltas over this run alone)."""
    before = cluster_.snapshot(setup)
    record = bench_online.run(cluster_.client(setup), requests, params, rate, concurrency, seed, progress)
    after = cluster_.snapshot(setup)
    load = SetupLoad.of(setup, {a: after[a] - before[a] for a in after})
    record.mode = setup
    record.extra["replicas"] = asdict(load)
    return record


def compare(summaries: dict, loads: dict[str, dict]) -> dict:
    """Each multi-replica setup's hit rate against one replica's, and its max/mean requests per replica."""
    out = {}
    single = summaries.get("single")
    for setup in (s for s in ("round_robin", "prefix") if s in summaries):
        rate = summaries[setup].prefix_cache_hit_rate
        if single is not None and rate is not None and single.prefix_cache_hit_rate:
            out[f"{setup}_hit_rate_vs_single"] = rate / single.prefix_cache_hit_rate
        if loads.get(setup, {}).get("max_over_mean") is not None:
            out[f"{setup}_max_over_mean_requests"] = loads[setup]["max_over_mean"]
    return out


def targets(comparisons: dict) -> dict[str, bool | None]:
    """Issue 19's targets, met or not (None: not measured in this run)."""
    hit = comparisons.get("prefix_hit_rate_vs_single")
    spread = comparisons.get("prefix_max_over_mean_requests")
    return {
        f"prefix_hit_rate_vs_single >= {TARGET_HIT_RATE_VS_SINGLE}": None
        if hit is None
        else hit >= TARGET_HIT_RATE_VS_SINGLE,
        f"prefix_max_over_mean_requests <= {TARGET_MAX_OVER_MEAN}": None
        if spread is None
        else spread <= TARGET_MAX_OVER_MEAN,
    }

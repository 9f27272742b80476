"""Prefix-affinity routing over engine replicas, in the SDK (no router process in between).

Each replica keeps its own prefix cache, keyed by the chain hash of full blocks of token ids. Requests
whose prompts start with the same blocks should therefore meet on one replica: the SDK names a prompt by
the chain hash of its first full blocks (the engine's own hash, `tokenwire.serving.block_hash`, with the
engine's block size) and ranks the replicas by rendezvous (highest-random-weight) hashing of that name.
Adding or removing a replica moves only the prefixes that replica wins or held.

- Bounded load: a replica is skipped while it already has more than `load_factor` x the mean of
  requests in flight (rounded up), so one hot prefix cannot pile everything onto one replica.
- Fallback: a replica that answers UNAVAILABLE (loading, draining, gone) or RESOURCE_EXHAUSTED (full)
  before the first token is left for the next one in rendezvous order; an unavailable one is ranked last
  for `down_s`.
- Prompts shorter than one block carry no prefix worth a cache: round robin.
- The name is re-resolved every `resolve_interval_s` (30 s, gRPC's minimum between DNS resolutions).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
from tokenwire.client.calls import CallScope, RetryPolicy, backoff
from tokenwire.client.errors import Endpoint, UnavailableError, from_rpc_error
from tokenwire.serving.block_hash import prefix_hash
from tokenwire.v1 import engine_pb2, engine_pb2_grpc

ROUTINGS = ("round_robin", "prefix")
_FALLBACK = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
Resolver = Callable[[str], Awaitable[list[str]]]


@dataclass(frozen=True)
class PrefixRouting:
    """Settings of `routing="prefix"`."""

    load_factor: float = 1.5  # no replica above this x the mean of requests in flight
    prefix_blocks: int = 4  # the first full blocks that name a prompt's prefix
    resolve_interval_s: float = 30.0  # re-resolve the replica set this often (gRPC's DNS minimum)
    down_s: float = 5.0  # a replica that answered UNAVAILABLE is tried last this long

    def __post_init__(self) -> None:
        if self.load_factor < 1.0:
            raise ValueError(f"load_factor: must be >= 1.0, got {self.load_factor}")
        if self.prefix_blocks < 1:
            raise ValueError(f"prefix_blocks: must be >= 1, got {self.prefix_blocks}")
        if self.resolve_interval_s < 0 or self.down_s < 0:
            raise ValueError("resolve_interval_s, down_s: must be >= 0")


@dataclass
class Replica:
    """One engine replica: its own channel, and what the router knows of it."""

    address: str
    channel: grpc.aio.Channel
    stub: engine_pb2_grpc.EngineServiceStub
    in_flight: int = 0  # Generate streams open to it from this client
    down_until: float = 0.0  # monotonic time until which it is ranked last


async def resolve(target: str) -> list[str]:
    """The replica addresses of a gRPC target: `dns:///host:port` -> every address the name has now;
    `ipv4:a:p,b:p` / `ipv6:...` -> those; anything else is one replica."""
    if target.startswith(("ipv4:", "ipv6:")):
        return sorted(set(target.split(":", 1)[1].split(",")))
    if not target.startswith("dns:"):
        return [target]
    host, port = _host_port(_dns_name(target))
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({_address(info[4][0], port) for info in infos})


def target_host(target: str) -> str:
    """The host name of a target (`dns:///engine:50052` -> `engine`), the name a TLS certificate carries."""
    authority = _dns_name(target) if target.startswith("dns:") else target
    return authority.rpartition(":")[0].strip("[]") or authority


def _dns_name(target: str) -> str:
    """`dns:///engine:50052`, `dns://8.8.8.8/engine:50052` or `dns:engine:50052` -> `engine:50052`."""
    rest = target[len("dns:") :]
    return rest[2:].partition("/")[2] if rest.startswith("//") else rest


def _host_port(authority: str) -> tuple[str, int]:
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"engine: a dns target needs host:port, got {authority!r}")
    return host.strip("[]"), int(port)


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def rendezvous(key: bytes, addresses: Sequence[str]) -> list[str]:
    """Addresses by descending weight hash(key, address): each key's own stable order of replicas."""
    weight = lambda a: hashlib.blake2b(key + a.encode(), digest_size=8).digest()  # noqa: E731
    return sorted(addresses, key=weight, reverse=True)


class PrefixRouter:
    """The replica set of one engine target and the choice of replica per request."""

    def __init__(
        self,
        target: str,
        open_channel: Callable[[str], grpc.aio.Channel],
        policy: PrefixRouting = PrefixRouting(),
        resolver: Resolver = resolve,
    ):
        self.target = target
        self.policy = policy
        self.routed: Counter[str] = Counter()  # requests sent to each address (attempts included)
        self._open = open_channel
        self._resolver = resolver
        self._replicas: dict[str, Replica] = {}
        self._resolved_at = -math.inf
        self._round_robin = itertools.count()

    @property
    def addresses(self) -> list[str]:
        return sorted(self._replicas)

    async def refresh(self) -> None:
        """Re-resolve when the last resolution is older than the interval: open new replicas, close gone ones."""
        if time.monotonic() - self._resolved_at < self.policy.resolve_interval_s and self._replicas:
            return
        try:
            addresses = await self._resolver(self.target)
        except OSError:  # a failed lookup (DNS down) keeps the replicas we know
            addresses = []
        self._resolved_at = time.monotonic()
        if not addresses:
            if not self._replicas:
                raise UnavailableError(f"engine: {self.target} resolves to no address", grpc.StatusCode.UNAVAILABLE)
            return
        for address in set(self._replicas) - set(addresses):
            await self._replicas.pop(address).channel.close(grace=None)
        for address in set(addresses) - set(self._replicas):
            channel = self._open(address)
            self._replicas[address] = Replica(address, channel, engine_pb2_grpc.EngineServiceStub(channel))

    def order(self, token_ids: Sequence[int], block_size: int) -> list[Replica]:
        """Replicas to try, best first: rendezvous order of the prompt's prefix (round robin below one
        block), replicas under the load bound before those above it, unavailable ones last."""
        addresses = self.addresses
        key = prefix_hash(token_ids, block_size, self.policy.prefix_blocks)
        if key is None:
            start = next(self._round_robin) % len(addresses)
            ranked = addresses[start:] + addresses[:start]
        else:
            ranked = rendezvous(key, addresses)
        replicas = [self._replicas[a] for a in ranked]
        now, capacity = time.monotonic(), self._capacity()
        # Stable sort: within each class the rendezvous (or round-robin) order stands.
        return sorted(replicas, key=lambda r: (r.down_until > now, r.in_flight + 1 > capacity))

    def _capacity(self) -> int:
        """Requests one replica may have in flight, counting the one being placed (bounded-load hashing)."""
        total = sum(r.in_flight for r in self._replicas.values()) + 1
        return math.ceil(self.policy.load_factor * total / len(self._replicas))

    def mark_down(self, replica: Replica) -> None:
        replica.down_until = time.monotonic() + self.policy.down_s

    async def close(self) -> None:
        for replica in self._replicas.values():
            await replica.channel.close()
        self._replicas.clear()


async def routed_stream(
    router: PrefixRouter, request: engine_pb2.GenerateRequest, block_size: int, retry: RetryPolicy, scope: CallScope
) -> AsyncIterator[engine_pb2.GenerateResponse]:
    """A Generate stream on the replica `router` picks, falling back along its order when a replica
    refuses before the first message (after that, a retry could generate twice: the error is raised)."""
    await router.refresh()
    order = router.order(request.token_ids.ids, block_size)
    tried: set[str] = set()
    for n in range(max(retry.max_attempts, 1)):
        replica = order[n % len(order)]
        if replica.address in tried:
            await backoff(retry, n, scope)  # every replica refused once: wait before the second round
        tried.add(replica.address)
        call = replica.stub.Generate(request, timeout=scope.remaining(), metadata=scope.metadata)
        router.routed[replica.address] += 1
        replica.in_flight += 1
        received = False
        try:
            async for message in call:
                received = True
                yield message
            return
        except grpc.aio.AioRpcError as error:
            last = n + 1 >= retry.max_attempts
            if received or error.code() not in _FALLBACK or last or _full_everywhere(error, order, tried):
                raise from_rpc_error(error, Endpoint("engine", replica.address)) from None
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                router.mark_down(replica)
        finally:
            replica.in_flight -= 1
            call.cancel()


def _full_everywhere(error: grpc.aio.AioRpcError, order: list[Replica], tried: set[str]) -> bool:
    # RESOURCE_EXHAUSTED is passed on to another replica, never retried on one that already refused.
    return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and len(tried) >= len(order)

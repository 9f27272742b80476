"""Prefix-affinity routing in the SDK: the hash it shares with the engine, rendezvous order, and real engine
replicas (tiny model, port 0) receiving requests by prefix, with fallback and bounded load."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from tokenwire.client import AsyncClient, Client, PrefixRouting, RetryPolicy, UnavailableError
from tokenwire.client.calls import CallScope
from tokenwire.client.credentials import open_channel
from tokenwire.client.routing import PrefixRouter, rendezvous, resolve, routed_stream, target_host
from tokenwire.engine.config import CacheConfig, EngineConfig, ServerConfig
from tokenwire.engine.scheduling.prefix_cache import PrefixCache
from tokenwire.serving.block_hash import ROOT_HASH, block_hash, prefix_hash
from tokenwire.v1 import engine_pb2 as pb
from tokenwire.v1 import engine_pb2_grpc

from tests.servers import EngineThread

BLOCK = 16


def prompt(seed: int, length: int = 3 * BLOCK) -> list[int]:
    """A prompt whose first blocks are unique to `seed` (ids stay inside the tiny model's vocabulary)."""
    return [(seed * 131 + i * 7) % 1000 + 10 for i in range(length)]


# ---- the hash the SDK and the engine share ----


def test_the_engine_finds_the_blocks_the_sdk_names():
    ids = prompt(1, 2 * BLOCK + 5)
    first = block_hash(ROOT_HASH, ids[:BLOCK])
    second = block_hash(first, ids[BLOCK : 2 * BLOCK])
    cache = PrefixCache()
    cache.register(7, first)
    cache.register(8, second)
    assert cache.match(ids, BLOCK) == ([7, 8], [first, second])  # the engine's lookup uses the same chain
    assert prefix_hash(ids, BLOCK, 4) == second and prefix_hash(ids, BLOCK, 1) == first
    assert prefix_hash(ids[: BLOCK - 1], BLOCK, 4) is None


def test_the_block_hash_is_pinned():
    # SDKs and engines of different versions must agree: a change here is a wire change.
    assert prefix_hash(list(range(40)), 16, 4).hex() == "b3c2067565eefdb38a373a8b9c6ac4f1"


def test_rendezvous_moves_only_the_keys_of_a_removed_replica():
    addresses = ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"]
    keys = [prefix_hash(prompt(i), BLOCK, 4) for i in range(300)]
    before = {k: rendezvous(k, addresses)[0] for k in keys}
    after = {k: rendezvous(k, addresses[:2])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == addresses[2] for k in moved)
    counts = [list(before.values()).count(a) for a in addresses]
    assert max(counts) / (len(keys) / 3) < 1.3, counts  # the hash spreads keys evenly


def test_settings_are_validated_naming_the_field():
    with pytest.raises(ValueError, match="load_factor"):
        PrefixRouting(load_factor=0.5)
    with pytest.raises(ValueError, match="prefix_blocks"):
        PrefixRouting(prefix_blocks=0)
    with pytest.raises(ValueError, match="routing"):
        Client(None, "localhost:1", routing="random")


def test_targets_resolve_to_replica_addresses():
    run = asyncio.run
    assert run(resolve("ipv4:127.0.0.1:2,127.0.0.1:1")) == ["127.0.0.1:1", "127.0.0.1:2"]
    assert run(resolve("localhost:50052")) == ["localhost:50052"]
    assert "127.0.0.1:50052" in run(resolve("dns:///localhost:50052"))
    assert "127.0.0.1:50052" in run(resolve("dns:localhost:50052"))
    with pytest.raises(ValueError, match="engine"):
        run(resolve("dns:///engine"))
    with pytest.raises(UnavailableError, match="no address"):
        run(PrefixRouter("dns:///nowhere.invalid:50052", lambda a: None).refresh())
    assert target_host("dns:///engine:50052") == "engine" and target_host("engine:50052") == "engine"


# ---- real replicas ----


def _config(model: str) -> EngineConfig:
    return EngineConfig(model=model, dtype="float32", cache=CacheConfig(block_size=BLOCK, num_blocks=256))


@pytest.fixture(scope="module")
def replicas(tiny_llama_dir):
    engines = [EngineThread(_config(tiny_llama_dir)) for _ in range(3)]
    yield engines
    for engine in engines:
        engine.close()


def _target(engines) -> str:
    return "ipv4:" + ",".join(e.address for e in engines)  # what DNS answers for the replicas


def _hit_rates(engines) -> dict[str, float]:
    rates = {}
    for engine in engines:
        with Client(None, engine.address, timeout=30) as single:
            rates[engine.address] = single.model_info().stats.prefix_cache_hit_rate
    return rates


def test_requests_sharing_a_prefix_meet_on_one_replica(replicas):
    with Client(None, _target(replicas), routing="prefix", timeout=60) as client:
        for seed in range(4):
            for suffix in range(3):
                client.complete(token_ids=prompt(seed) + [suffix + 1], max_new_tokens=1, temperature=0)
        routed = client.routed
    addresses = sorted(e.address for e in replicas)
    expected: dict[str, int] = {}
    for seed in range(4):  # each prefix's 3 requests went to its rendezvous winner, and nowhere else
        winner = rendezvous(prefix_hash(prompt(seed), BLOCK, 4), addresses)[0]
        expected[winner] = expected.get(winner, 0) + 3
    assert routed == expected


def test_shared_prefixes_hit_the_cache_of_the_replica_they_meet_on(replicas, tiny_llama_dir):
    engines = [EngineThread(_config(tiny_llama_dir)) for _ in range(2)]  # fresh caches
    try:
        with Client(None, _target(engines), routing="prefix", timeout=60) as client:
            for suffix in range(4):
                client.complete(token_ids=prompt(42) + [suffix + 1], max_new_tokens=1, temperature=0)
            (winner,) = client.routed
        rates = _hit_rates(engines)
        # 3 of 4 requests find the 3 shared blocks (48 of their 49 tokens): well above half.
        assert rates[winner] > 0.5 and [r for a, r in rates.items() if a != winner] == [0.0], rates
    finally:
        for engine in engines:
            engine.close()


def test_prompts_shorter_than_a_block_go_round_robin(replicas):
    with Client(None, _target(replicas), routing="prefix", timeout=60) as client:
        for _ in range(6):
            client.complete(token_ids=[5, 6, 7], max_new_tokens=1, temperature=0)
        assert sorted(client.routed.values()) == [2, 2, 2]


def test_an_unreachable_replica_falls_back_to_the_next_in_rendezvous_order(replicas, tiny_llama_dir):
    spare = EngineThread(_config(tiny_llama_dir))
    addresses = sorted([spare.address, *(e.address for e in replicas[:1])])
    seed = next(s for s in range(100) if rendezvous(prefix_hash(prompt(s), BLOCK, 4), addresses)[0] == spare.address)
    spare.close()  # the prefix's preferred replica is gone: connection refused, UNAVAILABLE
    with Client(
        None, "ipv4:" + ",".join(addresses), routing="prefix", timeout=60, retry=RetryPolicy(initial_backoff_s=0.01)
    ) as client:
        completion = client.complete(token_ids=prompt(seed), max_new_tokens=2, temperature=0)
        assert completion.usage.completion_tokens == 2
        assert client.routed == {spare.address: 1, replicas[0].address: 1}
        client.complete(token_ids=prompt(seed), max_new_tokens=2, temperature=0)
        # Marked down: the next request goes straight to the live replica.
        assert client.routed == {spare.address: 1, replicas[0].address: 2}


def test_a_full_replica_passes_the_request_to_the_next(replicas, tiny_llama_dir):
    full = EngineThread(_config(tiny_llama_dir), ServerConfig(port=0, max_pending_requests=1))
    try:
        addresses = sorted([full.address, replicas[0].address])
        seed = next(s for s in range(100) if rendezvous(prefix_hash(prompt(s), BLOCK, 4), addresses)[0] == full.address)
        with grpc.insecure_channel(full.address) as channel:  # another client fills its one slot
            stub = engine_pb2_grpc.EngineServiceStub(channel)
            hog = stub.Generate(
                pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingParams(max_new_tokens=2000, ignore_eos=True)
                )
            )
            next(hog)
            with Client(None, "ipv4:" + ",".join(addresses), routing="prefix", timeout=60) as client:
                completion = client.complete(token_ids=prompt(seed), max_new_tokens=2, temperature=0)
                assert completion.usage.completion_tokens == 2
                assert client.routed == {full.address: 1, replicas[0].address: 1}
            hog.cancel()
    finally:
        full.close()


def test_load_stays_within_the_bound_of_the_mean(replicas):
    async def scenario() -> list[int]:
        async with AsyncClient(None, _target(replicas), routing="prefix", timeout=60) as client:
            streams = [
                client.generate(token_ids=prompt(7) + [i + 1], max_new_tokens=50, ignore_eos=True, temperature=0)
                for i in range(9)
            ]
            for stream in streams:  # each one in flight before the next is placed
                await anext(stream)
            counts = sorted(client.routed.values())
            for stream in streams:
                await stream.aclose()
            return counts

    counts = asyncio.run(scenario())
    # Unbounded, all 9 would share one replica; bounded, none exceeds ceil(1.5 x the mean of 3).
    assert sum(counts) == 9 and max(counts) <= math.ceil(1.5 * 9 / 3) and len(counts) >= 2, counts


def test_the_replica_set_is_re_resolved(replicas):
    answer = [replicas[0].address, replicas[1].address]

    async def dns(_target: str) -> list[str]:  # a name whose records change, as a Deployment scales
        return list(answer)

    async def scenario() -> tuple[list[str], list[str], dict[str, int]]:
        router = PrefixRouter(
            "dns:///engine:50052",
            lambda a: open_channel(a, None, options=[], interceptors=[]),
            PrefixRouting(resolve_interval_s=0),
            resolver=dns,
        )
        try:
            seeds = range(30)
            for seed in seeds:
                await _one(router, prompt(seed))
            first = router.addresses
            answer[:] = [replicas[1].address, replicas[2].address]  # scaled: one replica gone, one new
            router.routed.clear()
            for seed in seeds:
                await _one(router, prompt(seed))
            return first, router.addresses, dict(router.routed)
        finally:
            await router.close()

    first, second, routed = asyncio.run(scenario())
    assert first == sorted(replicas[i].address for i in (0, 1))
    assert second == sorted(replicas[i].address for i in (1, 2))
    assert set(routed) == set(second) and min(routed.values()) > 0, routed


async def _one(router: PrefixRouter, ids: list[int]) -> None:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=pb.SamplingParams(max_new_tokens=1))
    async for _ in routed_stream(router, request, BLOCK, RetryPolicy(), CallScope(60)):
        pass

"""PrefixCache on its own: hash chain, longest-prefix match, duplicate registration, LRU eviction, stats."""

from __future__ import annotations

from tokenwire.engine.scheduling.prefix_cache import ROOT_HASH, PrefixCache, PrefixCacheStats, block_hash

BS = 4


def chain(token_ids, block_size=BS):
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def cache_with(token_ids, first_block_id=0):
    cache = PrefixCache()
    for i, h in enumerate(chain(token_ids)):
        assert cache.register(first_block_id + i, h)
    return cache


def test_block_hash_is_stable_128_bit_and_depends_on_parent_and_tokens():
    h = block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert len(h) == 16 and h == block_hash(ROOT_HASH, (1, 2, 3, 4))
    assert h != block_hash(ROOT_HASH, [1, 2, 3, 5])
    assert block_hash(h, [5, 6, 7, 8]) != block_hash(ROOT_HASH, [5, 6, 7, 8])
    assert block_hash(ROOT_HASH, [2**40, 0, 0, 0]) != block_hash(ROOT_HASH, [0, 2**40, 0, 0])


def test_full_match():
    tokens = list(range(12))
    blocks, hashes = cache_with(tokens, first_block_id=7).match(tokens, BS)
    assert blocks == [7, 8, 9] and hashes == chain(tokens)


def test_partial_match_stops_at_first_miss_and_ignores_partial_tail():
    cache = cache_with(list(range(12)))
    assert cache.match(list(range(8)) + [99, 9, 10, 11] + [12, 13], BS)[0] == [0, 1]
    assert cache.match(list(range(10)), BS)[0] == [0, 1]  # the 2-token tail is no full block
    assert cache.match([0, 1, 2], BS)[0] == []
    assert cache.match([], BS)[0] == []


def test_same_block_tokens_after_a_different_prefix_do_not_hit():
    cache = cache_with([0, 1, 2, 3, 10, 11, 12, 13])
    assert cache.match([9, 9, 9, 9, 10, 11, 12, 13], BS)[0] == []
    # Not even block 1 alone: its name commits to block 0's tokens.
    assert cache.match([10, 11, 12, 13], BS)[0] == []


def test_duplicate_content_is_registered_once():
    cache = PrefixCache()
    h = block_hash(ROOT_HASH, [1, 2, 3, 4])
    assert cache.register(3, h)
    assert not cache.register(5, h)  # same content computed by another sequence
    assert not cache.register(3, block_hash(ROOT_HASH, [4, 3, 2, 1]))  # block 3 already named
    assert cache.match([1, 2, 3, 4], BS)[0] == [3]
    assert cache.is_cached(3) and not cache.is_cached(5) and cache.num_cached_blocks == 1


def test_lru_evicts_least_recently_parked_and_forgets_its_hash():
    tokens = list(range(16))
    cache = cache_with(tokens)
    for block_id in (2, 0, 3, 1):
        cache.park(block_id)
    cache.unpark(0)  # hit again: no longer evictable
    assert cache.num_evictable == 3
    assert cache.evict() == 2
    assert not cache.is_cached(2)
    assert cache.match(tokens, BS)[0] == [0, 1]  # the chain now breaks at block 2
    cache.park(0)
    assert [cache.evict() for _ in range(3)] == [3, 1, 0]
    assert cache.num_evictable == 0 and cache.num_cached_blocks == 0


def test_stats_hit_rate():
    stats = PrefixCacheStats()
    assert stats.hit_rate == 0.0
    stats.record(100, 0)
    stats.record(100, 50)
    assert (stats.queried_tokens, stats.hit_tokens, stats.hit_rate) == (200, 50, 0.25)

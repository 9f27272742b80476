"""BlockManager on plain objects: allocation, prefix hits, copy-on-write, eviction, and a random
workload checked against a simulated KV store (every slot a sequence reads holds its own prefix)."""

from __future__ import annotations

import random

import pytest
from tokenwire.engine.request.sampling_params import SamplingParams
from tokenwire.engine.scheduling.block_manager import BlockManager
from tokenwire.engine.scheduling.sequence import Sequence

BS = 4


def make_seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams())


def compute(bm, seq, num_tokens=None):
    """What one engine step does for `seq`: slots for the tokens, then commit once their KV is written."""
    num_tokens = seq.num_tokens - seq.num_computed_tokens if num_tokens is None else num_tokens
    assert bm.ensure_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    bm.commit(seq)


def admit(bm, tokens, rid="r"):
    seq = make_seq(tokens, rid)
    seq.num_computed_tokens = bm.allocate_prefix(seq)
    return seq


def assert_all_free(bm, *freeing):
    """Free `freeing` first; then every block is free and unreferenced."""
    for seq in freeing:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks and bm.num_used_blocks == 0
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_blocks))


def test_allocate_grow_and_free_returns_every_block():
    bm = BlockManager(8, BS, enable_prefix_cache=False)
    seq = admit(bm, range(10))
    assert seq.num_computed_tokens == 0 and seq.block_table == []
    assert bm.blocks_needed(seq, 10) == 3
    compute(bm, seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_used_blocks == 3
    seq.output_token_ids.append(1)
    assert bm.blocks_needed(seq, 1) == 0  # position 10 still fits block 2
    compute(bm, seq, 1)
    seq.output_token_ids.append(2)
    assert bm.blocks_needed(seq, 1) == 0
    compute(bm, seq, 1)
    seq.output_token_ids.append(3)
    assert bm.blocks_needed(seq, 1) == 1  # position 12 opens block 3
    compute(bm, seq, 1)
    bm.free(seq)
    assert seq.block_table == []
    assert_all_free(bm)


def test_ensure_slots_is_all_or_nothing():
    bm = BlockManager(2, BS, enable_prefix_cache=True)
    seq = admit(bm, range(12))
    assert not bm.can_allocate(seq, 12)
    assert not bm.ensure_slots(seq, 12)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.ensure_slots(seq, 8) and len(seq.block_table) == 2


def test_full_and_partial_prefix_hits_after_free():
    bm = BlockManager(16, BS, enable_prefix_cache=True)
    first = admit(bm, range(10))
    compute(bm, first)
    first_table = list(first.block_table)
    bm.free(first)  # its 2 full blocks stay cached, evictable
    assert bm.num_free_blocks == 16
    hit = admit(bm, list(range(8)) + [50, 51, 52], "hit")
    assert hit.num_computed_tokens == 8 and hit.block_table == first_table[:2]
    partial = admit(bm, [0, 1, 2, 3, 99, 5, 6, 7, 8], "partial")
    assert partial.num_computed_tokens == 4 and partial.block_table == hit.block_table[:1]
    assert bm.ref_count(hit.block_table[0]) == 2
    stats = bm.prefix_cache_stats
    assert (stats.queried_tokens, stats.hit_tokens) == (10 + 11 + 9, 8 + 4)
    assert_all_free(bm, hit, partial)


def test_fully_cached_prompt_leaves_last_token_to_compute():
    bm = BlockManager(8, BS, enable_prefix_cache=True)
    compute(bm, first := admit(bm, range(8)))
    bm.free(first)
    again = admit(bm, range(8), "again")
    assert again.num_computed_tokens == 7 and len(again.block_table) == 2
    # Nobody else holds the last block: it is rewritten in place with the same token, no copy.
    assert bm.blocks_needed(again, 1) == 0
    compute(bm, again, 1)
    assert bm.pop_block_copies() == []


def test_copy_on_write_when_writing_into_a_shared_block():
    bm = BlockManager(8, BS, enable_prefix_cache=True)
    owner = admit(bm, range(8), "owner")
    compute(bm, owner)
    owner.output_token_ids.append(42)  # owner keeps running, holding both blocks
    twin = admit(bm, range(8), "twin")
    assert twin.num_computed_tokens == 7 and twin.block_table == owner.block_table
    shared = owner.block_table[1]
    assert bm.ref_count(shared) == 2
    assert bm.can_allocate(twin, 1) and bm.blocks_needed(twin, 1) == 1
    compute(bm, twin, 1)
    ((src, dst),) = bm.pop_block_copies()
    assert src == shared and dst not in owner.block_table
    assert twin.block_table == [owner.block_table[0], dst]
    assert bm.ref_count(shared) == 1 and bm.ref_count(dst) == 1
    assert bm.pop_block_copies() == []
    assert_all_free(bm, owner, twin)


def test_can_allocate_counts_revived_evictable_blocks_and_the_copy():
    bm = BlockManager(3, BS, enable_prefix_cache=True)
    compute(bm, first := admit(bm, range(8)))
    bm.free(first)  # 1 free + 2 evictable
    seq = make_seq(list(range(8)) + [9] * 5)
    match = bm.match_prefix(seq)
    assert match.num_cached_tokens == 8
    assert bm.can_allocate(seq, 4, match)  # pins the 2 cached blocks, takes the free one
    assert not bm.can_allocate(seq, 5, match)  # a 2nd new block would have to evict a pinned one
    holder = admit(bm, range(8), "holder")  # the cached blocks are referenced now
    twin = make_seq(range(8), "twin")
    assert bm.can_allocate(twin, 1, bm.match_prefix(twin))  # its copy takes the free block
    filler = make_seq([7] * 4, "filler")
    assert bm.ensure_slots(filler, 4)
    assert not bm.can_allocate(twin, 1, bm.match_prefix(twin))
    assert_all_free(bm, holder, filler)


def test_generated_tokens_are_cached_too():
    bm = BlockManager(8, BS, enable_prefix_cache=True)
    seq = admit(bm, range(6))
    compute(bm, seq)
    seq.output_token_ids.append(100)  # sampled, then fed at position 6
    compute(bm, seq, 1)
    seq.output_token_ids.append(101)  # sampled, not fed yet: block 1 is not full
    follow_up = make_seq(list(range(6)) + [100, 101, 5])
    assert bm.match_prefix(follow_up).num_cached_tokens == 4
    compute(bm, seq, 1)  # block 1 = [4, 5, 100, 101] is now indexed
    assert bm.match_prefix(follow_up).num_cached_tokens == 8


def test_eviction_only_when_free_list_is_empty_and_tail_blocks_first():
    bm = BlockManager(6, BS, enable_prefix_cache=True)
    a, b = admit(bm, range(8), "a"), admit(bm, range(100, 108), "b")
    compute(bm, a)
    compute(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    c = admit(bm, range(200, 216), "c")  # 4 blocks: 2 free, then evicts a's tail, a's head
    compute(bm, c)
    assert c.block_table[2:] == [a_blocks[1], a_blocks[0]]
    assert bm.match_prefix(make_seq(range(8))).block_ids == ()
    assert bm.match_prefix(make_seq(range(100, 108))).block_ids == tuple(b_blocks)


def test_reset_prefix_cache_forgets_everything_but_keeps_running_blocks():
    bm = BlockManager(8, BS, enable_prefix_cache=True)
    compute(bm, gone := admit(bm, range(8), "gone"))
    bm.free(gone)
    compute(bm, held := admit(bm, range(100, 108), "held"))
    bm.reset_prefix_cache()
    assert bm.prefix_cache.num_cached_blocks == 0 and bm.num_free_blocks == 6
    assert bm.match_prefix(make_seq(range(8))).block_ids == ()
    assert bm.match_prefix(make_seq(range(100, 108))).block_ids == ()
    held.output_token_ids.append(1)
    compute(bm, held, 1)  # its existing hashes still chain new blocks
    bm.free(held)
    assert_all_free(bm)


def test_disabled_prefix_cache_never_hits_or_keeps_blocks():
    bm = BlockManager(4, BS, enable_prefix_cache=False)
    compute(bm, first := admit(bm, range(8)))
    bm.free(first)
    again = admit(bm, range(8), "again")
    assert again.num_computed_tokens == 0 and again.block_table == []
    assert bm.prefix_cache is None and bm.prefix_cache_hit_rate == 0.0
    assert_all_free(bm)


def test_free_drops_a_pending_copy_into_its_blocks():
    bm = BlockManager(8, BS, enable_prefix_cache=True)
    compute(bm, owner := admit(bm, range(8), "owner"))
    twin = admit(bm, range(8), "twin")
    assert bm.ensure_slots(twin, 1)
    bm.free(twin)  # preempted before the step ran
    assert bm.pop_block_copies() == []
    bm.free(owner)
    assert_all_free(bm)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix", [True, False])
def test_random_workload_never_leaks_and_reads_back_its_own_prefix(seed, prefix):
    rng = random.Random(seed)
    bm = BlockManager(24, BS, enable_prefix_cache=prefix)
    kv: dict[int, tuple[int, ...]] = {}  # slot -> the token ids whose KV it holds
    live: list[Sequence] = []
    for step in range(400):
        op = rng.random()
        if op < 0.3 or not live:
            tokens = [rng.randrange(3) for _ in range(rng.randint(1, 14))]  # tiny alphabet: many hits
            seq = admit(bm, tokens, f"s{step}")
            live.append(seq)
        elif op < 0.45:
            bm.free(live.pop(rng.randrange(len(live))))
            continue
        else:
            seq = rng.choice(live)
        num_tokens = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
        if not bm.ensure_slots(seq, num_tokens):
            bm.free(seq)
            live.remove(seq)
            continue
        run_step(bm, seq, num_tokens, kv)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(rng.randrange(3))
        assert_readable(bm, seq, kv)
        assert sum(bm.ref_count(b) for b in range(bm.num_blocks)) == sum(len(s.block_table) for s in live)
    for seq in live:
        assert_readable(bm, seq, kv)
        bm.free(seq)
    assert_all_free(bm)


def run_step(bm, seq, num_tokens, kv):
    for src, dst in bm.pop_block_copies():
        for i in range(BS):
            if src * BS + i in kv:
                kv[dst * BS + i] = kv[src * BS + i]
    tokens = seq.all_token_ids
    for pos in range(seq.num_computed_tokens, seq.num_computed_tokens + num_tokens):
        kv[slot(seq, pos)] = tuple(tokens[: pos + 1])
    seq.num_computed_tokens += num_tokens
    bm.commit(seq)


def slot(seq, pos):
    return seq.block_table[pos // BS] * BS + pos % BS


def assert_readable(bm, seq, kv):
    tokens = seq.all_token_ids
    assert len(set(seq.block_table)) == len(seq.block_table)
    for pos in range(seq.num_computed_tokens):
        assert kv.get(slot(seq, pos)) == tuple(tokens[: pos + 1])


def test_a_sliding_window_gives_back_leading_blocks_once_and_forks_share_the_rest():
    bm = BlockManager(16, BS, enable_prefix_cache=True, window=5)
    parent = admit(bm, range(100, 122))  # 22 tokens: 6 blocks
    compute(bm, parent)
    bm.release_outside_window(parent)
    # Positions < 22 - 5 = 17 are never read again: blocks 0-3 (positions 0-15) go back, cached.
    assert bm.num_held_blocks(parent) == 2 and [bm.ref_count(b) for b in parent.block_table] == [0] * 4 + [1, 1]
    bm.release_outside_window(parent)  # idempotent: nothing is given back twice
    assert bm.num_held_blocks(parent) == 2 and bm.num_used_blocks == 2

    child = make_seq(range(100, 122), "c")
    bm.fork(parent, child, 21)  # takes only the blocks its parent still holds
    assert child.block_table == parent.block_table and bm.num_held_blocks(child) == 2
    assert [bm.ref_count(b) for b in parent.block_table[4:]] == [2, 2]

    other = admit(bm, range(100, 110), "o")  # the given-back blocks serve a prefix hit meanwhile
    assert other.num_computed_tokens == 8 and other.block_table == parent.block_table[:2]
    assert_all_free(bm, parent, child, other)


def test_without_a_window_every_block_stays():
    bm = BlockManager(16, BS, enable_prefix_cache=False)
    seq = admit(bm, range(40))
    compute(bm, seq)
    bm.release_outside_window(seq)
    assert bm.num_held_blocks(seq) == len(seq.block_table) == 10

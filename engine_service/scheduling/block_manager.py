"""The KV block pool: a fixed set of block ids, reference counts, per-sequence block tables,
copy-on-write for shared blocks and prefix reuse through `PrefixCache`. Plain Python: no torch, no gRPC.

Token position p of a sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`
of the runner's KV tensors. A block is in exactly one of three states: referenced (refcount > 0),
evictable (refcount 0 but its KV is cached under a hash, kept until the free list runs dry) or free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tokenwire.engine.scheduling.prefix_cache import ROOT_HASH, BlockHash, PrefixCache, PrefixCacheStats, block_hash
from tokenwire.engine.scheduling.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PrefixMatch:
    """A prefix-cache lookup for one sequence, before any reference is taken."""

    block_ids: tuple[int, ...] = ()  # cached blocks holding the longest chain of matching full blocks
    hashes: tuple[BlockHash, ...] = ()  # their chain hashes, in order
    num_cached_tokens: int = 0  # tokens served from them: capped so the last token is computed


NO_MATCH = PrefixMatch()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool, window: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        if window is not None and window < 1:
            raise ValueError(f"need window >= 1 or None, got {window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Every layer's sliding window (tokens), or None: some layer attends to all earlier positions.
        self.window = window
        self._released: dict[Sequence, int] = {}  # how many leading blocks each sequence gave back
        self.prefix_cache = PrefixCache() if enable_prefix_cache else None
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._hashes: dict[Sequence, list[BlockHash]] = {}  # chain hashes of each sequence's full blocks
        self._copies: list[tuple[int, int]] = []  # pending (src, dst) copies for the runner

    # ---- accounting ----

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can have: free ones plus unreferenced cached ones (evicted on demand)."""
        return len(self._free) + (self.prefix_cache.num_evictable if self.prefix_cache else 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_token_slots(self) -> int:
        """The longest sequence the pool can hold at all; a context longer than this cannot finish."""
        return self.num_blocks * self.block_size

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.prefix_cache.stats if self.prefix_cache else PrefixCacheStats()

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_stats.hit_rate

    def ref_count(self, block_id: int) -> int:
        return self._refs[block_id]

    # ---- admission ----

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Look up the longest cached prefix of the sequence's known tokens. Takes nothing."""
        if self.prefix_cache is None:
            return NO_MATCH
        blocks, hashes = self.prefix_cache.match(seq.all_token_ids, self.block_size)
        # The model must still produce logits for the last token, so it is never served from cache;
        # when every token hits, it is recomputed inside the last cached block (copy-on-write if shared).
        cached = max(min(len(blocks) * self.block_size, seq.num_tokens - 1), 0)
        return PrefixMatch(tuple(blocks), tuple(hashes), cached)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, match: PrefixMatch = NO_MATCH) -> bool:
        """Whether admitting `seq` with `match`, then giving it `num_new_tokens` slots, fits in the pool."""
        end = match.num_cached_tokens + num_new_tokens
        new_blocks = max(cdiv(end, self.block_size) - len(match.block_ids), 0)
        rewrites_hit = match.num_cached_tokens < len(match.block_ids) * self.block_size
        cow = int(rewrites_hit and num_new_tokens > 0 and self._refs[match.block_ids[-1]] > 0)
        revived = sum(1 for b in match.block_ids if self._refs[b] == 0)  # evictable blocks it would pin
        return new_blocks + cow + revived <= self.num_free_blocks

    def allocate_prefix(self, seq: Sequence, match: PrefixMatch | None = None) -> int:
        """Give a sequence with no blocks the cached blocks of its prefix; returns the cached token count.
        The caller sets `seq.num_computed_tokens` to it."""
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks")
        match = self.match_prefix(seq) if match is None else match
        for block_id in match.block_ids:
            self._take(block_id)
        seq.block_table = list(match.block_ids)
        self._hashes[seq] = list(match.hashes)
        if self.prefix_cache is not None:
            self.prefix_cache.stats.record(seq.num_tokens, match.num_cached_tokens)
        return match.num_cached_tokens

    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """Give `child` (no blocks yet) references to the blocks of `parent` holding its first `num_tokens`
        tokens: no copy now; the first write into a shared block copies it (copy-on-write)."""
        if child.block_table:
            raise RuntimeError(f"{child.request_id} already holds blocks")
        table = parent.block_table[: cdiv(num_tokens, self.block_size)]
        released = min(self._released.get(parent, 0), len(table))
        for block_id in table[released:]:
            self._take(block_id)
        child.block_table = list(table)
        if released:
            self._released[child] = released
        self._hashes[child] = list(self._hashes.get(parent, ())[: num_tokens // self.block_size])

    # ---- growth ----

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `ensure_slots(seq, num_new_tokens)` would take from the pool, copy-on-write included."""
        end = seq.num_computed_tokens + num_new_tokens
        grow = max(cdiv(end, self.block_size) - len(seq.block_table), 0)
        return grow + int(num_new_tokens > 0 and self._shared_write_block(seq) is not None)

    def num_writable_tokens(self, seq: Sequence) -> int:
        """How many new tokens `ensure_slots` could place for `seq` right now."""
        cow = int(self._shared_write_block(seq) is not None)
        slots = (len(seq.block_table) + self.num_free_blocks - cow) * self.block_size
        return max(slots - seq.num_computed_tokens, 0)

    def ensure_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give positions [num_computed_tokens, num_computed_tokens + num_new_tokens) private slots.
        All or nothing: False (and no change) when the pool cannot supply the blocks."""
        if self.blocks_needed(seq, num_new_tokens) > self.num_free_blocks:
            return False
        if num_new_tokens > 0:
            self._copy_on_write(seq)
        target = cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size)
        while len(seq.block_table) < target:
            seq.block_table.append(self._allocate())
        return True

    def _shared_write_block(self, seq: Sequence) -> int | None:
        """Index in the block table of the next block written, if other sequences also hold it."""
        index = seq.num_computed_tokens // self.block_size
        table = seq.block_table
        return index if index < len(table) and self._refs[table[index]] > 1 else None

    def _copy_on_write(self, seq: Sequence) -> None:
        index = self._shared_write_block(seq)
        if index is None:
            return
        src = seq.block_table[index]
        dst = self._allocate()
        self._release(src)  # still held by the others: refcount stays >= 1
        seq.block_table[index] = dst
        self._copies.append((src, dst))

    def reset_prefix_cache(self) -> None:
        """Drop all cached KV (benchmarks, or after changing weights); running sequences are unaffected."""
        if self.prefix_cache is not None:
            self._free.extend(self.prefix_cache.clear())

    def pop_block_copies(self) -> list[tuple[int, int]]:
        """(src, dst) block copies the runner must do before this step's forward pass."""
        copies, self._copies = self._copies, []
        return copies

    # ---- after a step, and release ----

    def commit(self, seq: Sequence) -> None:
        """Index every block the sequence has newly filled (prompt or generated tokens alike)."""
        if self.prefix_cache is None:
            return
        hashes = self._hashes.setdefault(seq, [])
        bs = self.block_size
        # Accepted drafts are computed before they are appended: only blocks of known tokens are hashed.
        for i in range(len(hashes), min(seq.num_computed_tokens, seq.num_tokens) // bs):
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(block_hash(parent, _token_slice(seq, i * bs, (i + 1) * bs)))
            self.prefix_cache.register(seq.block_table[i], hashes[-1])

    def release_outside_window(self, seq: Sequence) -> None:
        """Give back the leading blocks no later query of `seq` reads: every layer slides, and a query at
        position p sees positions > p - window. The table keeps their ids, so every position keeps its slot;
        attention masks them (the native decode kernel skips them), whoever holds those blocks now."""
        if self.window is None:
            return
        # Drafts past num_tokens may be rolled back; a forked sample recomputes the prompt's last token
        # (one position before its parent's next query): blocks wholly before known - window are unread.
        known = min(seq.num_computed_tokens, seq.num_tokens)
        release = min(max((known - self.window) // self.block_size, 0), len(seq.block_table))
        done = self._released.get(seq, 0)
        for block_id in seq.block_table[done:release]:
            self._release(block_id)  # committed already: a cached block parks for prefix reuse
        if release > done:
            self._released[seq] = release

    def num_held_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` holds references to (its table, less those given back outside the window)."""
        return len(seq.block_table) - self._released.get(seq, 0)

    def truncate(self, seq: Sequence) -> None:
        """Give back the blocks past `seq.num_computed_tokens` (those of rejected drafts). Never cached: a
        block is registered only once its tokens are computed and known."""
        keep = cdiv(seq.num_computed_tokens, self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Tail blocks are released first so they are evicted first:
        a prefix is worth more than its continuation, which is useless without it."""
        held = seq.block_table[self._released.pop(seq, 0) :]  # blocks given back earlier belong to others now
        for block_id in reversed(held):
            self._release(block_id)
        if self._copies:  # a copy into a block just given back would only clobber its next owner
            freed = set(held)
            self._copies = [(s, d) for s, d in self._copies if d not in freed]
        seq.block_table = []
        self._hashes.pop(seq, None)

    # ---- the pool ----

    def _allocate(self) -> int:
        block_id = self._free.popleft() if self._free else self.prefix_cache.evict()
        self._refs[block_id] = 1
        return block_id

    def _take(self, block_id: int) -> None:
        if self._refs[block_id] == 0:
            self.prefix_cache.unpark(block_id)
        self._refs[block_id] += 1

    def _release(self, block_id: int) -> None:
        self._refs[block_id] -= 1
        if self._refs[block_id] > 0:
            return
        if self.prefix_cache is not None and self.prefix_cache.is_cached(block_id):
            self.prefix_cache.park(block_id)
        else:
            self._free.append(block_id)


def _token_slice(seq: Sequence, start: int, end: int) -> list[int]:
    """seq.all_token_ids[start:end] without concatenating the whole sequence (called every step)."""
    prompt, n = seq.prompt_token_ids, seq.num_prompt_tokens
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return seq.output_token_ids[start - n : end - n]
    return prompt[start:] + seq.output_token_ids[: end - n]

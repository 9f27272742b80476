"""Content-addressed index of full KV blocks, keyed on token ids only, with LRU eviction.

A block is named by a hash chain: hash(parent block's hash, this block's token ids). The same tokens
after a different prefix therefore get a different name, so a hit on block i implies blocks 0..i-1
hit too and a lookup is the longest chain of hits. Digests are 128-bit BLAKE2b: a collision is not a
practical concern, so hits are not re-verified token by token. Plain Python: no torch, no gRPC.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

# One definition for the engine and the SDK's prefix-affinity routing (serving/block_hash.py).
from tokenwire.serving.block_hash import ROOT_HASH, BlockHash, block_hash

__all__ = ["ROOT_HASH", "BlockHash", "PrefixCache", "PrefixCacheStats", "block_hash"]


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # tokens looked up at admission (prompt, plus outputs after a preemption)
    hit_tokens: int = 0  # of those, tokens whose KV came from the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def record(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit


class PrefixCache:
    """Maps chain hashes to block ids. Knows nothing of reference counts: the block manager tells it
    when a cached block loses its last reference (`park`) or gains one back (`unpark`)."""

    def __init__(self) -> None:
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        # Cached blocks nobody references, least recently released first: evicted in that order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def match(self, token_ids: Seq[int], block_size: int) -> tuple[list[int], list[BlockHash]]:
        """The longest chain of cached full blocks that prefixes `token_ids`: (block ids, their hashes)."""
        blocks: list[int] = []
        hashes: list[BlockHash] = []
        parent = ROOT_HASH
        for start in range(0, len(token_ids) - block_size + 1, block_size):
            parent = block_hash(parent, token_ids[start : start + block_size])
            block_id = self._block_of.get(parent)
            if block_id is None:
                break
            blocks.append(block_id)
            hashes.append(parent)
        return blocks, hashes

    def register(self, block_id: int, block_hash_: BlockHash) -> bool:
        """Index a freshly filled block. False when that content is already cached in another block
        (two sequences computed it independently): the duplicate simply stays uncached."""
        if block_hash_ in self._block_of or block_id in self._hash_of:
            return False
        self._block_of[block_hash_] = block_id
        self._hash_of[block_id] = block_hash_
        return True

    def park(self, block_id: int) -> None:
        """A cached block lost its last reference: keep its KV, make it the most recent eviction candidate."""
        self._evictable[block_id] = None

    def unpark(self, block_id: int) -> None:
        """A parked block was hit again: it is referenced, so no longer evictable."""
        del self._evictable[block_id]

    def evict(self) -> int:
        """Forget the least recently released cached block and return its id for reuse."""
        block_id, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block_id)]
        return block_id

    def clear(self) -> list[int]:
        """Forget every cached block; returns the evictable ones, now plain free blocks. Blocks still
        referenced stay with their sequences, uncached. Stats are cumulative and kept."""
        freed = list(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()
        return freed

"""The chain hash that names a full KV block, shared by the engine's prefix cache (which keys cached
blocks by it) and the SDK's prefix-affinity routing (which routes a prompt by its first blocks), so both
agree on what "the same prefix" is. Plain Python: no torch, no gRPC.

A block is named by hash(parent block's hash, this block's token ids): the same tokens after a different
prefix get a different name. Digests are 128-bit BLAKE2b over the ids as signed 64-bit integers.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

BlockHash = bytes
ROOT_HASH: BlockHash = bytes(16)  # the parent of every sequence's first block


def block_hash(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The chain hash of one full block: commits to its token ids and, through `parent`, all before."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def prefix_hash(token_ids: Sequence[int], block_size: int, max_blocks: int) -> BlockHash | None:
    """The chain hash of the first `max_blocks` full blocks (fewer if the prompt is shorter); None when
    the prompt does not fill one block."""
    if block_size <= 0:
        raise ValueError(f"block_size: must be positive, got {block_size}")
    blocks = min(len(token_ids) // block_size, max_blocks)
    if blocks == 0:
        return None
    parent = ROOT_HASH
    for start in range(0, blocks * block_size, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
    return parent

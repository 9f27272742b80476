"""Paged KV storage and attention over it, for one flat batch of decodes and prefill chunks.

Layout per layer: `[num_blocks, block_size, kv_heads, head_dim]`. A sequence's position `p` lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Each step the new K/V rows are written into
their slots with one `index_copy_`, then:
- decodes (one query each) attend in a few batched groups of similar context lengths: their blocks
  are gathered block-wise (whole 16-token runs, cheap memcpys) into a padded
  `[group, blocks * block_size]` view and masked by length;
- each prefill chunk attends with SDPA over its own context, causal and offset by the tokens already
  cached (earlier chunks, prefix-cache hits); a chunk with no cached context attends to its own K/V.
Index tensors and masks are built once per step (`AttentionBatch.build`) and shared by every layer.

With the native CPU kernels (`models/kernels.py`) decodes read the cache in place instead: one group
of every decode, no gather, no mask; and the Llama forward writes K/V into the cache itself while it
applies rope (`written=True` below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, num_blocks, block_size, kv_heads, head_dim]
    v: torch.Tensor

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """K and V of one block in every layer."""
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        # Zeros, not empty: padded slots are masked, but NaN garbage would still poison probs @ V.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy every layer's K/V of block src into block dst (copy-on-write of shared blocks)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.k.device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.k.device)
        for cache in (self.k, self.v):
            cache.index_copy_(1, dst, cache.index_select(1, src))


# Padding every decode to the longest context wastes gather + attention work; a split into groups of
# similar lengths costs about this many padded key slots in extra per-layer ops (measured on 2 CPU cores).
_GROUP_COST_SLOTS = 256
_MAX_DECODE_GROUPS = 4


@dataclass
class DecodeGroup:
    """Decodes in rows [begin, end): one query each, keys gathered block-wise, padded to `width`."""

    begin: int
    end: int
    block_ids: torch.Tensor  # [(end - begin) * width // block_size], padded with block 0
    lens: torch.Tensor  # [end - begin] context length including the new token
    width: int
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # per sliding window

    @property
    def tables(self) -> torch.Tensor:
        """[end - begin, width // block_size] block table of each decode, padded with block 0."""
        return self.block_ids.view(self.end - self.begin, -1)

    def mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """[n, 1, 1, width] additive: key j is visible iff j < len (and within the window)."""
        mask = self.masks.get(window)
        if mask is None:
            keys = torch.arange(self.width, device=self.lens.device)
            lens = self.lens[:, None]
            visible = keys < lens
            if window is not None:
                visible &= keys > lens - 1 - window
            mask = self.masks[window] = _additive(visible, dtype)[:, None, None, :]
        return mask


@dataclass
class PrefillSpan:
    """One multi-token chunk: rows [begin, end) of the flat batch, positions [start, start + n)."""

    begin: int
    end: int
    start: int
    block_ids: torch.Tensor | None  # blocks of positions [0, start + n); None: no cached context
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # per sliding window

    def mask(self, window: int | None, block_size: int, q: torch.Tensor) -> torch.Tensor | None:
        """[n, keys] additive, for a chunk with context or a window; None means plain causal."""
        if window in self.masks:
            return self.masks[window]
        n = self.end - self.begin
        mask = None
        if self.block_ids is not None or (window is not None and n > window):
            width = n if self.block_ids is None else self.block_ids.numel() * block_size
            query_pos = torch.arange(self.start, self.start + n, device=q.device)[:, None]
            keys = torch.arange(width, device=q.device) + (0 if self.block_ids is not None else self.start)
            visible = keys <= query_pos
            if window is not None:
                visible &= keys > query_pos - window
            mask = _additive(visible, q.dtype)
        self.masks[window] = mask
        return mask


@dataclass
class AttentionBatch:
    """Per-step attention metadata: decode groups first in row order, then prefill spans."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot of every new token
    decodes: list[DecodeGroup]
    prefills: list[PrefillSpan]
    block_size: int
    native: object | None = None  # the native kernel module, or None: torch ops

    @classmethod
    def build(
        cls,
        spans: list[tuple[list[int], int, int]],
        num_decodes: int,
        block_size: int,
        device: torch.device,
        native=None,
    ) -> AttentionBatch:
        """`spans`: (block_table, start, num_tokens) in row order; the first `num_decodes` are 1-token
        decodes sorted by context length, so groups of similar lengths are row ranges."""
        slots: list[int] = []
        for table, start, n in spans:
            _extend_slots(slots, table, start, start + n, block_size)
        lens = [start + 1 for _, start, _ in spans[:num_decodes]]
        ranges = ([(0, num_decodes)] if num_decodes else []) if native else _split_decodes(lens, block_size)
        decodes = [_decode_group(spans[b:e], b, block_size, device) for b, e in ranges]
        prefills, row = [], num_decodes
        for table, start, n in spans[num_decodes:]:
            blocks = None
            if start > 0:  # earlier positions come from the cache
                blocks = torch.tensor(table[: -(-(start + n) // block_size)], dtype=torch.long, device=device)
            prefills.append(PrefillSpan(row, row + n, start, blocks))
            row += n
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
        return cls(slot_mapping, decodes, prefills, block_size, native)


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where visible, -inf elsewhere: SDPA adds a float mask as is (a bool one it converts per call)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def _split_decodes(lens: list[int], block_size: int) -> list[tuple[int, int]]:
    """Row ranges of decode groups over `lens` (sorted): the equal-count split with the least padding."""
    if not lens:
        return []
    best, best_cost = [(0, len(lens))], None
    for groups in range(1, min(_MAX_DECODE_GROUPS, len(lens)) + 1):
        bounds = [round(i * len(lens) / groups) for i in range(groups + 1)]
        ranges = list(zip(bounds, bounds[1:]))
        cost = sum((e - b) * -(-max(lens[b:e]) // block_size) * block_size for b, e in ranges)
        cost += _GROUP_COST_SLOTS * groups
        if best_cost is None or cost < best_cost:
            best, best_cost = ranges, cost
    return best


def _decode_group(spans, begin: int, block_size: int, device) -> DecodeGroup:
    lens = [start + 1 for _, start, _ in spans]
    max_blocks = -(-max(lens) // block_size)
    ids: list[int] = []
    for (table, _, _), length in zip(spans, lens):
        used = -(-length // block_size)
        ids += table[:used]
        ids += [0] * (max_blocks - used)
    return DecodeGroup(
        begin,
        begin + len(spans),
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(lens, dtype=torch.long, device=device),
        max_blocks * block_size,
    )


def _extend_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    pos = start
    while pos < end:  # block by block: one range per block, not one Python step per token
        block, offset = divmod(pos, block_size)
        stop = min(end, (block + 1) * block_size)
        base = table[block] * block_size
        slots.extend(range(base + offset, base + offset + stop - pos))
        pos = stop


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int | None = None,
    written: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [T, H, d], k/v [T, kv_heads, d] for this step's tokens; one layer's caches. Returns [T, H * d].
    `written`: the caller already put k/v into their cache slots. `softcap`: scores become
    softcap * tanh(scores / softcap) before the mask (Gemma 2); SDPA and the native decode kernel have
    no such step, so those layers run the explicit softmax below."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    if not written:  # rounded to the cache's dtype where it is narrower than the model's
        k_cache.view(-1, kv_heads, head_dim).index_copy_(0, batch.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, kv_heads, head_dim).index_copy_(0, batch.slot_mapping, v.to(v_cache.dtype))
    if batch.native is not None and batch.decodes and softcap is None:
        group = batch.decodes[0]  # one group: the kernel reads each decode's own length only
        outs = [
            batch.native.paged_decode(
                q[group.begin : group.end], k_cache, v_cache, group.tables, group.lens, scale, window or 0
            )
        ]
        outs += [_prefill(q, k, v, k_cache, v_cache, span, batch.block_size, scale, window) for span in batch.prefills]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    outs = [_decode(q, k_cache, v_cache, group, scale, window, softcap) for group in batch.decodes]
    outs += [
        _prefill(q, k, v, k_cache, v_cache, span, batch.block_size, scale, window, softcap) for span in batch.prefills
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _sdpa(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """SDPA over [B, H, L, d] / [B, kv_heads, S, d]; `mask` None means causal. With a soft-cap, the
    explicit form HF's eager attention computes (softmax in float32)."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    if mask is None:
        length = scores.shape[-1]
        mask = _additive(torch.ones(length, length, dtype=torch.bool, device=q.device).tril_(), q.dtype)
    probs = torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _decode(
    q, k_cache, v_cache, group: DecodeGroup, scale: float, window: int | None, softcap: float | None = None
) -> torch.Tensor:
    n, num_heads, head_dim = group.end - group.begin, q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[2]
    keys = k_cache.index_select(0, group.block_ids).view(n, -1, kv_heads, head_dim).to(q.dtype)
    values = v_cache.index_select(0, group.block_ids).view(n, -1, kv_heads, head_dim).to(q.dtype)
    out = _sdpa(
        q[group.begin : group.end].unsqueeze(2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        group.mask(window, q.dtype),
        scale,
        softcap,
    )
    return out.view(n, num_heads * head_dim)


def _prefill(
    q,
    k,
    v,
    k_cache,
    v_cache,
    span: PrefillSpan,
    block_size: int,
    scale: float,
    window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    n, num_heads, head_dim = span.end - span.begin, q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    if span.block_ids is None:  # the chunk is the whole context: its own K/V, no gather
        keys, values = k[span.begin : span.end], v[span.begin : span.end]
    else:
        keys = k_cache.index_select(0, span.block_ids).view(-1, kv_heads, head_dim).to(q.dtype)
        values = v_cache.index_select(0, span.block_ids).view(-1, kv_heads, head_dim).to(q.dtype)
    mask = span.mask(window, block_size, q)
    out = _sdpa(
        q[span.begin : span.end].transpose(0, 1).unsqueeze(0),
        keys.transpose(0, 1).unsqueeze(0),
        values.transpose(0, 1).unsqueeze(0),
        mask,
        scale,
        softcap,
    )
    return out[0].transpose(0, 1).reshape(n, num_heads * head_dim)

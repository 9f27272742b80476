"""Quantized linear weights: the two block layouts the native GEMV reads (cpu_quant.cpp), made from GGUF
tensors or quantized at load, and their de-quantization (the pure-torch reference and fallback).

- q4: uint8 [N, K/32, 20], GGML's block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles (byte j: weight j low,
  weight j+16 high); w = d*q + m. Q4_1 is read as it is; Q4_0 (m = -8d) and Q4_K (each 32-weight
  sub-block's d*scale and -dmin*min, rounded to fp16) are rewritten into it.
- q8: int8 [N, K/G, 2+G], fp16 d then G int8 q; w = d*q. G = 32 is GGML's block_q8_0 (Q8_0, and
  `--quantization int8`); Q6_K becomes G = 16 (its sub-blocks: d*scale rounded to fp16, q - 32).

Rounding a Q4_K or Q6_K sub-block's scale (and min) to fp16 moves a weight by at most 2^-11 of those
terms (under 1/100 of a 4-bit step); every other type keeps its weights exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# GGUF tensor types kept in blocks; any other type is de-quantized to the model dtype at load.
SUPPORTED_GGUF_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0")
_QK_K = 256


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear weight [out_features, in_features] held as blocks (`blocks`: the layouts above)."""

    blocks: torch.Tensor
    source_type: str  # the GGUF type (or "int8") it came from, for logs and the benchmark

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0] * (TILE_ROWS if is_tiles(self.blocks) else 1)

    @property
    def in_features(self) -> int:
        return self.blocks.shape[1] * group_size(self.blocks)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.blocks).to(dtype)


def group_size(blocks: torch.Tensor) -> int:
    return 32 if blocks.dtype == torch.uint8 else blocks.shape[2] - 2


def concat(weights: list[QuantizedWeight]) -> QuantizedWeight | None:
    """Fused projections side by side (rows stacked), or None where their layouts differ."""
    first = weights[0].blocks
    if any(w.blocks.dtype != first.dtype or w.blocks.shape[1:] != first.shape[1:] for w in weights):
        return None
    kinds = sorted({w.source_type for w in weights})
    return QuantizedWeight(torch.cat([w.blocks for w in weights]), "+".join(kinds))


# ---- de-quantization: what the native GEMV computes against ----


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] of q4 or q8 blocks (or q4 tiles)."""
    if is_q4_tiles(blocks):
        blocks = untile_q4(blocks)
    elif is_q8_tiles(blocks):
        blocks = untile_q8(blocks)
    n, nb, _ = blocks.shape
    raw = blocks.view(torch.uint8)
    d = raw[..., 0:2].contiguous().view(torch.float16).float()  # [N, nb, 1]
    if blocks.dtype == torch.uint8:
        m = raw[..., 2:4].contiguous().view(torch.float16).float()
        qs = raw[..., 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # [N, nb, 32]
        return (q * d + m).view(n, nb * 32)
    q = blocks[..., 2:].float()
    return (q * d).view(n, -1)


# ---- tiles: 16 rows' blocks interleaved for the VNNI GEMV (the layouts are drawn in cpu_quant.cpp) ----

TILE_ROWS = 16
_TILE_BYTES = 320  # q4
_Q8_TILE_BYTES = 544


def is_q4_tiles(blocks: torch.Tensor) -> bool:
    return blocks.dtype == torch.uint8 and blocks.shape[2] == _TILE_BYTES


def is_q8_tiles(blocks: torch.Tensor) -> bool:
    return blocks.dtype == torch.uint8 and blocks.shape[2] == _Q8_TILE_BYTES


def is_tiles(blocks: torch.Tensor) -> bool:
    return is_q4_tiles(blocks) or is_q8_tiles(blocks)


def tile(blocks: torch.Tensor) -> torch.Tensor | None:
    """q4 or Q8_0 (G 32) blocks as tiles of 16 rows, or None for a layout without tiles (G 16, N not a
    multiple of 16, tiles already)."""
    if blocks.shape[0] % TILE_ROWS or is_tiles(blocks):
        return None
    if blocks.dtype == torch.uint8:
        return tile_q4(blocks)
    return tile_q8(blocks) if blocks.shape[2] == 34 else None


def tile_q8(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks [N, K/32, 34] as tiles [N/16, K/32, 544]: per block, 16 rows' d, then q + 128 as bytes
    (the dot product multiplies unsigned bytes by signed ones), byte 64*g + 4*r + t = row r's weight 4g+t."""
    n, nb, _ = blocks.shape
    rows = blocks.view(n // TILE_ROWS, TILE_ROWS, nb, 34).permute(0, 2, 1, 3)  # [T, nb, r, 34]
    d = rows[..., 0:2].reshape(-1, nb, 32).view(torch.uint8)
    q = (rows[..., 2:].to(torch.int16) + 128).to(torch.uint8)
    q = q.reshape(-1, nb, TILE_ROWS, 8, 4).permute(0, 1, 3, 2, 4).reshape(-1, nb, 512)
    return torch.cat([d, q], dim=-1).contiguous()


def untile_q8(tiles: torch.Tensor) -> torch.Tensor:
    """The Q8_0 blocks [N, K/32, 34] that `tile_q8` interleaved."""
    t, nb, _ = tiles.shape
    d = tiles[..., 0:32].reshape(t, nb, TILE_ROWS, 2).view(torch.int8)
    q = tiles[..., 32:].reshape(t, nb, 8, TILE_ROWS, 4).permute(0, 1, 3, 2, 4).reshape(t, nb, TILE_ROWS, 32)
    rows = torch.cat([d, (q.to(torch.int16) - 128).to(torch.int8)], dim=-1)  # [T, nb, r, 34]
    return rows.permute(0, 2, 1, 3).reshape(t * TILE_ROWS, nb, 34).contiguous()


def tile_q4(blocks: torch.Tensor) -> torch.Tensor:
    """q4 blocks [N, K/32, 20] (N a multiple of 16) as tiles [N/16, K/32, 320]: per block, 16 rows' d, their
    m, then nibble byte 64*g + 4*r + t = row r's source byte 4g+t."""
    n, nb, _ = blocks.shape
    rows = blocks.view(n // TILE_ROWS, TILE_ROWS, nb, 20).permute(0, 2, 1, 3)  # [T, nb, r, 20]
    d, m = rows[..., 0:2].reshape(-1, nb, 32), rows[..., 2:4].reshape(-1, nb, 32)
    nibbles = rows[..., 4:].reshape(-1, nb, TILE_ROWS, 4, 4).permute(0, 1, 3, 2, 4).reshape(-1, nb, 256)
    return torch.cat([d, m, nibbles], dim=-1).contiguous()


def untile_q4(tiles: torch.Tensor) -> torch.Tensor:
    """The q4 blocks [N, K/32, 20] that `tile_q4` interleaved."""
    t, nb, _ = tiles.shape
    d = tiles[..., 0:32].reshape(t, nb, TILE_ROWS, 2)
    m = tiles[..., 32:64].reshape(t, nb, TILE_ROWS, 2)
    nibbles = tiles[..., 64:].reshape(t, nb, 4, TILE_ROWS, 4).permute(0, 1, 3, 2, 4).reshape(t, nb, TILE_ROWS, 16)
    rows = torch.cat([d, m, nibbles], dim=-1)  # [T, nb, r, 20]
    return rows.permute(0, 2, 1, 3).reshape(t * TILE_ROWS, nb, 20).contiguous()


def quantize_activations(x: torch.Tensor, residual: bool = False) -> torch.Tensor:
    """Activation rows [M, K] as the native GEMV on blocks meets them (float32): int8 per row and block of 32,
    round-half-even(x * 127 / max|x|), times max|x| / 127 (llama.cpp's q8_1), in the kernel's float ops.
    `residual` (against 8-bit weights): plus the rest, x minus that, quantized the same way (cpu_quant.cpp)."""
    m, k = x.shape
    groups = x.float().reshape(m, k // 32, 32)
    first = _quantize_blocks(groups)
    if residual:
        first = first + _quantize_blocks(groups - first)
    return first.view(m, k)


def _quantize_blocks(groups: torch.Tensor) -> torch.Tensor:
    amax = groups.abs().amax(-1, keepdim=True)
    # 127 / amax as one IEEE division (a scalar over a tensor is a reciprocal, then a product, in torch)
    scale = torch.where(amax > 0, torch.full_like(amax, 127.0).div_(amax), torch.zeros_like(amax))
    return torch.round(groups * scale) * (amax / 127.0)


def has_8bit_weights(blocks: torch.Tensor) -> bool:
    """q8 blocks or q8 tiles: the GEMV meets them with two levels of activations."""
    return blocks.dtype == torch.int8 or is_q8_tiles(blocks)


# ---- from GGUF tensors (numpy, as gguf's reader maps them: [N, row bytes]) ----


def from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedWeight:
    """Blocks for a GGUF tensor of a SUPPORTED_GGUF_TYPES type; `shape` is (N, K)."""
    n, k = shape
    rows = np.ascontiguousarray(data).reshape(n, -1)
    if type_name == "Q4_1":
        blocks = torch.from_numpy(rows.copy()).view(n, k // 32, 20)
    elif type_name == "Q4_0":
        blocks = _q4_0_to_q4(rows.reshape(n, k // 32, 18))
    elif type_name == "Q4_K":
        blocks = _q4_k_to_q4(rows.reshape(n, k // _QK_K, 144))
    elif type_name == "Q8_0":
        blocks = torch.from_numpy(rows.copy()).view(torch.int8).view(n, k // 32, 34)
    elif type_name == "Q6_K":
        blocks = _q6_k_to_q8(rows.reshape(n, k // _QK_K, 210))
    else:
        raise ValueError(f"GGUF type {type_name} is not kept in blocks; supported: {', '.join(SUPPORTED_GGUF_TYPES)}")
    return QuantizedWeight(blocks.contiguous(), type_name)


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _q4_0_to_q4(b: np.ndarray) -> torch.Tensor:
    d = b[..., 0:2].copy().view(np.float16)  # [n, nb, 1]
    out = np.concatenate([b[..., 0:2], _fp16(-8.0 * d.astype(np.float32))[..., 0, :], b[..., 2:]], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out))


def _q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of each Q4_K super-block (GGML's get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q4_k_to_q4(b: np.ndarray) -> torch.Tensor:
    n, nsb, _ = b.shape
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)  # [n, nsb, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _q4_k_scales(b[..., 4:16])
    scale = d * sc  # [n, nsb, 8]
    minimum = -(dmin * mn)
    # 4 chunks of 32 bytes; chunk c's low nibbles are sub-block 2c, its high nibbles sub-block 2c+1.
    qs = b[..., 16:].reshape(n, nsb, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nsb, 8, 32)  # [.., sub-block, weight]
    packed = q[..., :16] | (q[..., 16:] << 4)
    out = np.concatenate([_fp16(scale), _fp16(minimum), packed], axis=-1)  # [n, nsb, 8, 20]
    return torch.from_numpy(np.ascontiguousarray(out).reshape(n, nsb * 8, 20))


def _q6_k_to_q8(b: np.ndarray) -> torch.Tensor:
    n, nsb, _ = b.shape
    ql = b[..., 0:128].reshape(n, nsb, 2, 64)  # two halves of 128 weights
    qh = b[..., 128:192].reshape(n, nsb, 2, 32)
    scales = b[..., 192:208].copy().view(np.int8).astype(np.float32)  # [n, nsb, 16]
    d = b[..., 208:210].copy().view(np.float16).astype(np.float32)
    # GGML's dequantize_row_q6_K: within a half, weight l + 32*j takes ql's nibble and qh's bits 2j.
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
    high = np.stack([(qh >> (2 * j)) & 3 for j in range(4)], axis=3)
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)  # [n, nsb, 2, 4, 32]
    q = q.reshape(n, nsb * 16, 16)
    scale = (d * scales).reshape(n, nsb * 16)
    out = np.concatenate([_fp16(scale), q.view(np.uint8)], axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out)).view(torch.int8)


# ---- quantized at load (--quantization int8) ----


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8 blocks of 32 (Q8_0) for a dense [N, K] weight, K a multiple of 32."""
    n, k = weight.shape
    groups = weight.detach().float().view(n, k // 32, 32)
    d = groups.abs().amax(-1, keepdim=True) / 127.0
    d16 = d.to(torch.float16)
    inverse = torch.where(d16 > 0, 1.0 / d16.float(), torch.zeros_like(d))
    q = torch.round(groups * inverse).clamp_(-127, 127).to(torch.int8)
    blocks = torch.cat([d16.view(torch.int8).view(n, k // 32, 2), q], dim=-1)
    return QuantizedWeight(blocks.contiguous(), "int8")

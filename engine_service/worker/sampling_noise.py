"""The sampler's randomness: a counter-based RNG in int32/int64 tensor ops, no generator state.

splitmix64 turns (seed, position) into a row key; lowbias32 mixes it with each vocab id's key; the bits
become Gumbel noise. Element (row, vocab id) is a pure function of the two, so a seeded request draws
the same tokens whatever shares its batch, and a row's candidates see the noise the whole row would.
"""

from __future__ import annotations

import torch

# Noise is built in vocabulary tiles of about this many elements so its int32 temporaries stay in cache.
_NOISE_TILE_ELEMENTS = 1 << 17
_UNIFORM_BITS = 23  # k + 0.5 stays exact in float32, so u never rounds to 0 or 1


def _signed(value: int, bits: int) -> int:
    """An unsigned constant as the signed integer with the same bits (torch lacks unsigned arithmetic)."""
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


_GOLDEN64 = _signed(0x9E3779B97F4A7C15, 64)
_SPLITMIX = (_signed(0xBF58476D1CE4E5B9, 64), _signed(0x94D049BB133111EB, 64))
_GOLDEN32 = 0x9E3779B9
_LOWBIAS = (_signed(0x7FEB352D, 32), _signed(0x846CA68B, 32))


def vocab_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """int32 key per vocab id (Weyl sequence of the golden ratio), mixed with a row key by `gumbel`."""
    return _int32(torch.arange(vocab, dtype=torch.long, device=device) * _GOLDEN32)


def row_keys(seeds: list[int], positions: list[int], device: torch.device) -> torch.Tensor:
    """int32 key per row from (seed, position) through splitmix64: the counter of a counter-based RNG."""
    seed = torch.tensor(seeds, dtype=torch.long, device=device)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    return (_splitmix64(_splitmix64(seed + _GOLDEN64) + pos * _GOLDEN64) >> 32).to(torch.int32)


def gumbel(row_keys: torch.Tensor, vocab_keys: torch.Tensor) -> torch.Tensor:
    """Gumbel noise [rows, width]: element (r, j) is a pure function of row_keys[r] and its vocab key
    (vocab_keys is [width], or [rows, width] for per-row candidates)."""
    rows, width = row_keys.shape[0], vocab_keys.shape[-1]
    out = torch.empty(rows, width, dtype=torch.float32, device=row_keys.device)
    tile = width if row_keys.device.type == "cuda" else max(256, _NOISE_TILE_ELEMENTS // rows)
    for start in range(0, width, tile):
        z = row_keys[:, None] ^ vocab_keys[..., start : start + tile]
        scratch = torch.empty_like(z)
        _lowbias32_(z, scratch)
        torch.bitwise_right_shift(z, 32 - _UNIFORM_BITS, out=scratch).bitwise_and_((1 << _UNIFORM_BITS) - 1)
        u = out[:, start : start + tile].copy_(scratch)
        u.mul_(2.0**-_UNIFORM_BITS).add_(2.0 ** -(_UNIFORM_BITS + 1))  # (k + 0.5) / 2^bits in (0, 1)
        u.log_().neg_().log_().neg_()
    return out


def _lowbias32_(z: torch.Tensor, scratch: torch.Tensor) -> None:
    """In place: Wellons' lowbias32 integer finaliser on int32 bits (logical shifts emulated)."""
    for shift, multiplier in ((16, _LOWBIAS[0]), (15, _LOWBIAS[1]), (16, None)):
        torch.bitwise_right_shift(z, shift, out=scratch).bitwise_and_((1 << (32 - shift)) - 1)
        z.bitwise_xor_(scratch)
        if multiplier is not None:
            z.mul_(multiplier)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 bits (logical shifts emulated)."""
    for shift, multiplier in ((30, _SPLITMIX[0]), (27, _SPLITMIX[1]), (31, None)):
        z = z ^ ((z >> shift) & ((1 << (64 - shift)) - 1))
        if multiplier is not None:
            z = z * multiplier
    return z


def _int32(z: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of int64 values, as int32."""
    low = z & 0xFFFFFFFF
    return torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)

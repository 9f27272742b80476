"""The GEMM layer of the native forwards: y = x @ W.T + b on oneDNN's prepacked weight, or on the native
few-row GEMV for a single stream's decode (see `Linear`)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tokenwire.engine.models import kernels
from tokenwire.engine.models import quantized as q
from tokenwire.engine.models.quantized import QuantizedWeight

log = logging.getLogger(__name__)


def gemm_rows(m: int) -> int:
    """The row count a GEMM of `m` rows runs at: `m` up to 16, then rounded up to a step of 1/16 of the
    next power of two, at least 16 (steps of 16 to 256, 32 to 512, 64 to 1024): 47 shapes up to 1024
    rows, padded by under 16 rows (where a GEMM reads its weight at memory speed whatever the rows) or
    under 1/8 of them. oneDNN keeps a compiled kernel per shape (and the allocator a pool per size):
    with every step's token count as its own shape, the engine core's RSS kept growing (a tiny model's
    soak: +336 MiB over 1,200 requests; +20 MiB padded)."""
    if m <= 16:
        return m
    step = max(16, (1 << (m - 1).bit_length()) // 16)
    return -(-m // step) * step


# The most rows a GEMM runs through the native GEMV (cpu_linear.cpp's kGemvMaxRows).
GEMV_MAX_ROWS = 4
_GEMV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Linear:
    """y = x @ weight.T + bias. On CPU the weight is prepacked once for oneDNN, whose GEMMs beat
    MKL's at the batch sizes an engine runs (docs/benchmarks.md); F.linear everywhere else.

    `gemv` (the native kernel, or None): GEMMs of up to GEMV_MAX_ROWS rows (a single stream's decode)
    go through it instead, reading the plain weight at memory speed where oneDNN's GEMM reads its packed
    copy more slowly (bf16) or pays a fixed cost per call (fp32). Both copies are then kept: twice the
    weight memory of the linear layers, the price of faster single-stream decoding (cpu_linear.cpp,
    docs/benchmarks.md)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        gemv=None,
        quantized: QuantizedWeight | None = None,
    ):
        """`quantized`: the weight's blocks (quantized.py). The few-row GEMV then reads them, and the
        many-row GEMMs run on their de-quantization in the weight's dtype (the exact same weights)."""
        if quantized is not None:
            weight = quantized.dequantize(weight.dtype).to(weight.device)
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        self._packed = _onednn_pack(weight)
        self._gemv = gemv if weight.dtype in _GEMV_DTYPES and weight.device.type == "cpu" else None
        # Blocks only serve the native GEMV; without it the dense weight does everything.
        self.quantized = _for_gemv(quantized) if self._gemv is not None else None
        # The packed copy replaces the plain weight unless the GEMV reads it (plain, not blocks).
        plain_for_gemv = self._gemv is not None and self.quantized is None
        self.weight = weight if self._packed is None or plain_for_gemv else None

    @property
    def packed(self) -> torch.Tensor | None:
        """The oneDNN-prepacked weight (what `mkldnn::_linear_pointwise` takes), or None on F.linear."""
        return self._packed

    @property
    def gemv_weight(self) -> torch.Tensor | None:
        """What the native GEMV reads for few-row GEMMs (the plain weight, or the quantized blocks), or
        None where it is not used."""
        if self._gemv is None:
            return None
        return self.quantized.blocks if self.quantized is not None else self.weight

    @property
    def nbytes(self) -> int:
        """The memory its weights hold: the packed copy, the plain weight, the blocks."""
        held = [t for t in (self._packed, self.weight, self.bias) if t is not None]
        blocks = self.quantized.nbytes if self.quantized is not None else 0
        return blocks + sum(t.numel() * t.element_size() for t in held)

    @property
    def gemv_bytes(self) -> int:
        """The bytes one few-row GEMM reads (0 where the native GEMV is not used)."""
        w = self.gemv_weight
        return 0 if w is None else w.numel() * w.element_size()

    def drop_dense_copy(self) -> None:
        """Quantized weights only: keep the blocks alone (`--no-quantized-dense-copy`). GEMMs of any row
        count then run the native GEMV, GEMV_MAX_ROWS rows a pass over the blocks: the least memory, at
        the price of batches and prefill (docs/benchmarks.md has the measured cost)."""
        if self.quantized is not None and self._gemv is not None:
            self._packed = self.weight = None

    def _on_gemv(self, m: int) -> bool:
        # No packed and no plain weight: only drop_dense_copy leaves that, and the GEMV takes every row count.
        blocks_only = self._packed is None and self.weight is None
        return self._gemv is not None and m > 0 and (m <= GEMV_MAX_ROWS or blocks_only)

    def _row_groups(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The GEMV over `x`, GEMV_MAX_ROWS rows a call (one call where `x` has that few)."""
        if x.shape[0] <= GEMV_MAX_ROWS:
            return self._gemv(x, self.gemv_weight, self.bias, residual)
        parts = [
            self._gemv(
                x[i : i + GEMV_MAX_ROWS],
                self.gemv_weight,
                self.bias,
                None if residual is None else residual[i : i + GEMV_MAX_ROWS],
            )
            for i in range(0, x.shape[0], GEMV_MAX_ROWS)
        ]
        return torch.cat(parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if self._on_gemv(m):
            return self._row_groups(x, None)
        if self._packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(_pad_rows(x, gemm_rows(m)), self._packed, self.bias, "none", [], "")
            return y if y.shape[0] == m else y[:m]
        return F.linear(x, self.weight, self.bias)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ weight.T + bias, the residual add done inside the GEMM (a new tensor on
        oneDNN and the GEMV, `residual` updated in place otherwise)."""
        m = x.shape[0]
        if self._on_gemv(m):
            return self._row_groups(x, residual)
        if self._packed is not None:
            rows = gemm_rows(m)
            y = torch.ops.mkldnn._linear_pointwise.binary(
                _pad_rows(x, rows), _pad_rows(residual, rows), self._packed, self.bias, "add"
            )
            return y if y.shape[0] == m else y[:m]
        residual.addmm_(x, self.weight.t())
        return residual if self.bias is None else residual.add_(self.bias)


def _for_gemv(weight: QuantizedWeight | None) -> QuantizedWeight | None:
    """Blocks as tiles of 16 rows where the GEMV runs those faster (kernels.tiles_pay)."""
    if weight is None or not kernels.tiles_pay():
        return weight
    tiles = q.tile(weight.blocks)
    return weight if tiles is None else QuantizedWeight(tiles, weight.source_type)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else F.pad(x, (0, 0, 0, rows - x.shape[0]))


_ONEDNN_OK: dict[torch.dtype, bool] = {}


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or not onednn_works(weight.dtype):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def onednn_works(dtype: torch.dtype) -> bool:
    """Whether this torch build runs prepacked oneDNN linears in `dtype` and agrees with F.linear."""
    if dtype not in _ONEDNN_OK:
        ok = False
        if dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available():
            try:
                with torch.no_grad():
                    x, w, b = (
                        torch.randn(5, 64, dtype=dtype),
                        torch.randn(48, 64, dtype=dtype),
                        torch.randn(48, dtype=dtype),
                    )
                    packed = torch.ops.mkldnn._reorder_linear_weight(w)
                    got = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
                    ok = torch.allclose(got.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
            except (RuntimeError, AttributeError):  # op missing or dtype unsupported in this build
                ok = False
        _ONEDNN_OK[dtype] = ok
        log.info("GEMM backend for %s on CPU: %s", dtype, "oneDNN prepacked" if ok else "F.linear")
    return _ONEDNN_OK[dtype]

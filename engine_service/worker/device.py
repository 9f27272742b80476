"""Device and dtype choice: `auto` picks what is fastest on this machine, and logs why."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tokenwire.engine.models.linear import Linear

log = logging.getLogger(__name__)

_EXPLICIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 must beat fp32 by this factor on the probe GEMM to be worth its lower precision.
_BF16_MIN_SPEEDUP = 1.25
# One decode-sized GEMM of a small model: (tokens, hidden) @ (hidden, intermediate).
_PROBE_SHAPE = (32, 576, 1536)


def choose_device(name: str = "auto") -> torch.device:
    """`auto` -> the first CUDA device if there is one, else the CPU; explicit names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device: unknown device {name!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: only cpu and cuda are supported, got {name!r}")
    return device


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """An explicit dtype is honoured; `auto` picks bf16/fp16 on CUDA and the faster of bf16/fp32 on CPU."""
    if name in _EXPLICIT_DTYPES:
        return _EXPLICIT_DTYPES[name]
    if name != "auto":
        raise ValueError(f"dtype: expected auto, {', '.join(_EXPLICIT_DTYPES)}; got {name!r}")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        log.info("dtype auto -> %s (CUDA device %s)", dtype, torch.cuda.get_device_name(device))
        return dtype
    return _cpu_auto_dtype()


def dtype_name(dtype: torch.dtype) -> str:
    """"float32", "bfloat16", ...: the name the flags take and the reports print."""
    return str(dtype).removeprefix("torch.")


def choose_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: `auto` is the model's; a float32 model may keep bfloat16 or float16 K/V (half
    the bytes that decode attention reads, outputs no longer bit-exact). Never wider than the model's."""
    if name == "auto":
        return model_dtype
    if name not in _EXPLICIT_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected auto, {', '.join(_EXPLICIT_DTYPES)}; got {name!r}")
    dtype = _EXPLICIT_DTYPES[name]
    if dtype != model_dtype and not (model_dtype == torch.float32 and dtype.itemsize == 2):
        model = dtype_name(model_dtype)
        raise ValueError(f"kv_cache_dtype: {name} under a {model} model; expected auto, {model}, or bfloat16 / "
                         "float16 under a float32 model")
    return dtype


def _cpu_auto_dtype() -> torch.dtype:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if not capability.startswith("AVX512") or not native:
        log.info("dtype auto -> float32: CPU capability %s, no native bf16 (flags: %s)",
                 capability, native or "none")
        return torch.float32
    fp32_s, bf16_s = _probe_gemm(torch.float32), _probe_gemm(torch.bfloat16)
    speedup = fp32_s / bf16_s
    dtype = torch.bfloat16 if speedup >= _BF16_MIN_SPEEDUP else torch.float32
    log.info("dtype auto -> %s: CPU capability %s with %s; probe GEMM bf16 is %.2fx fp32 speed",
             dtype, capability, "+".join(native), speedup)
    return dtype


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _probe_gemm(dtype: torch.dtype, reps: int = 8) -> float:
    """Best-of-reps seconds for one decode-sized matmul in `dtype`, through the backend we would use."""
    m, k, n = _PROBE_SHAPE
    x, linear = torch.randn(m, k).to(dtype), Linear(torch.randn(n, k).to(dtype))
    linear(x)  # warm-up: first calls pick kernels and allocate
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        linear(x)
        best = min(best, time.perf_counter() - start)
    return best

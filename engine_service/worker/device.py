"""Device and dtype choice: `auto` picks what is fastest on this machine, and logs why."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_EXPLICIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def choose_dtype(name: str, device: torch.device, native_forward: bool = True) -> torch.dtype:
    """An explicit dtype is honoured; `auto` picks bf16/fp16 on CUDA, and on CPU bf16 where it is native
    (`cpu_auto_dtype`), else fp32. `native_forward=False` (the transformers fallback): fp32 on CPU, where
    the HF modules' own bf16 ops decoded SmolLM2 5.8x slower than fp32 on an AVX-512 BF16 EPYC (no AMX)."""
    if name in _EXPLICIT_DTYPES:
        return _EXPLICIT_DTYPES[name]
    if name != "auto":
        raise ValueError(f"dtype: expected auto, {', '.join(_EXPLICIT_DTYPES)}; got {name!r}")
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        log.info("dtype auto -> %s (CUDA device %s)", dtype, torch.cuda.get_device_name(device))
        return dtype
    if not native_forward:
        log.info("dtype auto -> float32: the transformers fallback on a CPU")
        return torch.float32
    return _cpu_auto_dtype()


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32", "bfloat16", ...: the name the flags take and the reports print."""
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
        raise ValueError(
            f"kv_cache_dtype: {name} under a {model} model; expected auto, {model}, or bfloat16 / "
            "float16 under a float32 model"
        )
    return dtype


def _cpu_auto_dtype() -> torch.dtype:
    dtype, why = cpu_auto_dtype(torch.backends.cpu.get_cpu_capability(), _cpu_flags())
    log.info("dtype auto -> %s: %s", dtype_name(dtype), why)
    return dtype


def cpu_auto_dtype(capability: str, flags: set[str]) -> tuple[torch.dtype, str]:
    """bf16 where the CPU computes it natively (AMX or AVX-512 BF16, under torch's AVX-512 kernels), fp32
    elsewhere, where bf16 is emulated. Decided from the CPU's features alone, never by a timing, so every
    replica on the same kind of host serves the same dtype (a probe GEMM timed at startup flipped under
    load). Returns the dtype and the reason, for the log."""
    native = sorted(flags & {"amx_bf16", "avx512_bf16"})
    if capability.startswith("AVX512") and native:
        return torch.bfloat16, f"CPU capability {capability} with native bf16 ({'+'.join(native)})"
    return torch.float32, f"CPU capability {capability}, no native bf16 (flags: {', '.join(native) or 'none'})"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()

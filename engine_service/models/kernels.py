"""The native CPU kernels of `cpu_kernels.cpp`, `cpu_attention.cpp`, `cpu_decode.cpp` and `cpu_linear.cpp`, built
once with the machine's compiler, and their pure-torch equivalents.

`native()` compiles the source with `torch.utils.cpp_extension.load` (gcc, -O3 -march=native -fno-trapping-math) into
`$TOKENWIRE_HOME/kernels/<torch>-<cpu capability>-<source hash>/` the first time (~1 min on 2 cores,
logged) and loads it from there afterwards (well under a second). It returns None, and the model falls
back to the torch ops below, when the build fails (no compiler, no ninja), when
the engine is configured without them (`--no-native-kernels`: the config decides, this module reads no
environment), or off the CPU. The fallbacks define what the kernels compute; a parity
test holds the two together.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenwire.engine.models import quantized

log = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).with_name(name)
    for name in ("cpu_kernels.cpp", "cpu_attention.cpp", "cpu_decode.cpp", "cpu_linear.cpp", "cpu_quant.cpp")
]
_HEADER = Path(__file__).with_name("cpu_kernels.h")
_loaded: dict[str, object] = {}


def native():
    """`torch.ops.tokenwire` (the compiled kernels), or None when they are unavailable or switched off."""
    if "module" not in _loaded:
        _loaded["module"] = _load()
    return _loaded["module"]


def _load():
    missing = [p.name for p in (*_SOURCES, _HEADER) if not p.exists()]
    if missing:
        log.warning("native CPU kernels: %s missing; torch ops instead", ", ".join(missing))
        return None
    from torch.utils import cpp_extension

    _put_ninja_on_path()

    build_dir = build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    # The real path: through a symlinked $TOKENWIRE_HOME/kernels (the compose test's volume) the ninja
    # file would name other source paths, and each side would rebuild what the other built (~100 s each).
    build_dir = build_dir.resolve()
    cached = any(build_dir.glob("*.so"))
    start = time.perf_counter()
    try:
        with _build_lock(build_dir):
            sources = _copy_sources(build_dir)
            cpp_extension.load(
                name="tokenwire_cpu_kernels",
                sources=[str(p) for p in sources],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-trapping-math"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=False,
            )
        module = torch.ops.tokenwire
    except Exception as error:  # no compiler, no ninja, a header mismatch: run on torch ops
        log.warning(
            "native CPU kernels unavailable (%s: %s); torch ops instead",
            type(error).__name__,
            str(error).strip().splitlines()[-1:] or "",
        )
        return None
    log.info(
        "native CPU kernels %s from %s in %.1f s",
        "loaded" if cached else "built",
        build_dir,
        time.perf_counter() - start,
    )
    return module


def build_directory() -> Path:
    """`$TOKENWIRE_HOME/kernels/<torch>-<cpu capability>-<hash of the sources and torch's path>/`: a new build for
    any change of the sources, one per environment."""
    from tokenwire.serving.model_resolver import tokenwire_home

    # the torch install is hashed too: the ninja file names its include paths, one per environment
    torch_dir = str(Path(torch.__file__).resolve().parent).encode()
    digest = hashlib.sha256(b"".join([*(p.read_bytes() for p in (*_SOURCES, _HEADER)), torch_dir])).hexdigest()[:12]
    tag = f"{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}-{digest}".replace("+", "_")
    return tokenwire_home() / "kernels" / tag


def _copy_sources(build_dir: Path) -> list[Path]:
    """The sources copied into the build directory, and the paths cpp_extension is given.

    cpp_extension rebuilds whenever its ninja file changes, and that file names the sources' absolute
    paths: two checkouts of the same sources (a worktree, CI's clone) took turns rebuilding one
    directory. Compiled from a copy whose path is the build directory's own, every checkout with the
    same sources (the directory's hash) shares one build."""
    source_dir = build_dir / "src"
    source_dir.mkdir(exist_ok=True)
    for path in (*_SOURCES, _HEADER):
        copy = source_dir / path.name
        content = path.read_bytes()
        if not copy.exists() or copy.read_bytes() != content:
            copy.write_bytes(content)
    return [source_dir / path.name for path in _SOURCES]


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """One build or load at a time per build directory, under a lock the OS drops when its holder dies.

    cpp_extension takes its own lock file (`lock`, created exclusively, deleted when done) even to load a
    finished build, and waits for it forever: a process killed mid-build (kill -9, OOM, a container
    stopped during the first start) left it behind, and every later start hung. Holding this flock, no
    live process owns that file, so a leftover is removed."""
    with open(build_dir / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("native CPU kernels: removing %s, left by a build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pinned `ninja` package installs it next to the venv's
    python, which is not on PATH when the venv's python is run by its path (as `make test` does)."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


# ---- pure-torch equivalents: what the kernels compute, used wherever the native module is not ----


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: in float32, rounded to the model dtype before the weight."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return weight * normed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a fused [T, 2I] gate_up output; the gate half is overwritten (what the native
    `silu_mul` computes into a new [T, I] tensor, and the torch forward does inline)."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter], inplace=True).mul_(gate_up[:, inter:])


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """One query per row over its blocks `tables[i]` (padded with any valid block), keys [0, lens[i]),
    the last `window` of them with a sliding window. q [n, H, d]; caches [blocks, bs, kv_heads, d]."""
    n, num_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    ids = tables.reshape(-1)
    keys = k_cache.index_select(0, ids).view(n, -1, kv_heads, head_dim).to(q.dtype)
    values = v_cache.index_select(0, ids).view(n, -1, kv_heads, head_dim).to(q.dtype)
    positions = torch.arange(tables.shape[1] * block_size, device=q.device)
    visible = positions < lens[:, None]
    if window is not None:
        visible &= positions > lens[:, None] - 1 - window
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.view(n, num_heads * head_dim)


def tiles_pay() -> bool:
    """Whether the GEMV should read q4 and Q8_0 weights as tiles of 16 rows (quantized.tile): where the CPU has
    AVX512-VNNI, whose 16-lane dot products they feed (cpu_quant.cpp); row by row is faster elsewhere."""
    if "q4_tiles" not in _loaded:
        try:
            with open("/proc/cpuinfo") as f:
                _loaded["q4_tiles"] = any(line.startswith("flags") and " avx512_vnni" in line for line in f)
        except OSError:
            _loaded["q4_tiles"] = False
    return _loaded["q4_tiles"]


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
) -> torch.Tensor:
    """x @ weight.T (+ bias) (+ residual), summed in float32 and rounded once to x's dtype: what the
    native `gemv` computes for a few rows (it reads the plain weight, or quantized blocks, at memory
    speed). On quantized blocks the activations are quantized to int8 per block of 32 as well (two levels
    against 8-bit weights)."""
    dtype = x.dtype
    if weight.dim() == 3:  # quantized blocks
        two_levels = quantized.has_8bit_weights(weight)
        x, weight = quantized.quantize_activations(x, two_levels), quantized.dequantize(weight)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return (y if residual is None else y.add_(residual.float())).to(dtype)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum of each row (NaN counts as the maximum): the native `argmax`."""
    return x.argmax(-1)

"""The native CPU kernels against their pure-torch equivalents (models/kernels.py), in fp32 and bf16,
and the torch fallback selected when the build is unavailable or switched off."""

from __future__ import annotations

import pytest
import torch
from tokenwire.engine.models import kernels
from tokenwire.engine.models.linear import onednn_works
from tokenwire.engine.models.llama import apply_rope

native = kernels.native()
needs_native = pytest.mark.skipif(native is None, reason="native CPU kernels unavailable on this machine")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
# A whole forward's logits through two GEMM backends (oneDNN vs MKL's sgemv or the GEMV): each layer adds
# in its own order, and the differences compound over layers (1.4e-5 seen on an AVX-512 BF16 EPYC).
FORWARD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: TOL[torch.bfloat16]}
DTYPES = [torch.float32, torch.bfloat16]


# (heads, kv_heads, head_dim, block_size, context lengths, window): the vectorized kernel (head_dim 64, 128),
# the general loop (48), and two long contexts that the kernel splits across threads and merges.
DECODE_CASES = {
    "d64": (9, 3, 64, 4, [1, 4, 5, 13, 30], 7),
    "d128": (4, 2, 128, 16, [1, 17, 33, 16], 5),
    "d48-general": (6, 3, 48, 4, [3, 20], 7),
    "long-split": (9, 3, 64, 16, [700, 1500], 300),
}


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_paged_decode_matches_gather_and_sdpa(dtype, windowed, case):
    torch.manual_seed(0)
    heads, kv_heads, d, block_size, lens, window = DECODE_CASES[case]
    window = window if windowed else None
    lens = torch.tensor(lens)
    width = -(-int(lens.max()) // block_size)
    blocks = width * len(lens) + 1
    k_cache = torch.randn(blocks, block_size, kv_heads, d).to(dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, d).to(dtype)
    perm = torch.randperm(blocks)  # shuffled tables, padded with block 0 as the runner pads them
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        used = -(-n // block_size)
        tables[i, :used] = perm[i * width : i * width + used]
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * d).to(dtype)
    q = qkv[:, : heads * d].view(len(lens), heads, d)  # strided rows, as the model passes them
    got = native.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, window or 0)
    want = kernels.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, window)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@needs_native
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["d64", "d48-general", "long-split"])
def test_paged_decode_reads_a_narrower_cache_under_float32_queries(cache_dtype, case):
    torch.manual_seed(4)
    heads, kv_heads, d, block_size, lens, window = DECODE_CASES[case]
    lens = torch.tensor(lens)
    width = -(-int(lens.max()) // block_size)
    k_cache = torch.randn(width * len(lens) + 1, block_size, kv_heads, d).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(width * len(lens)).view(len(lens), width)
    q = torch.randn(len(lens), heads, d)
    got = native.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, window)
    assert got.dtype == torch.float32
    want = kernels.paged_decode(q, k_cache.float(), v_cache.float(), tables, lens, 0.125, window)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="caches"):  # never wider than the queries
        native.paged_decode(q.to(cache_dtype), k_cache.float(), v_cache.float(), tables, lens, 0.125, 0)


@needs_native
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_rope_and_cache_rounds_into_a_narrower_cache(cache_dtype):
    torch.manual_seed(5)
    T, heads, kv_heads, d = 5, 4, 2, 32
    qkv = torch.randn(T, (heads + 2 * kv_heads) * d)
    angles = torch.rand(T, d // 2) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([7, 0, 3, 12, 9])
    k_cache = torch.zeros(4, 4, kv_heads, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    rotated = apply_rope(qkv[:, : (heads + kv_heads) * d].view(T, -1, d), cos[:, None], sin[:, None])
    values = qkv[:, (heads + kv_heads) * d :].view(T, kv_heads, d).clone()
    native.rope_and_cache(qkv, cos, sin, slots, k_cache, v_cache, heads, kv_heads)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * d].view(T, -1, d), rotated, **TOL[torch.float32])
    assert torch.equal(
        k_cache.view(-1, kv_heads, d)[slots].float(),
        qkv[:, heads * d : (heads + kv_heads) * d].view(T, kv_heads, d).to(cache_dtype).float(),
    )
    assert torch.equal(v_cache.view(-1, kv_heads, d)[slots], values.to(cache_dtype))


@needs_native
@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("lens", [[700, 1500], [5, 300, 17, 64, 0, 129, 1, 800], [40]])
def test_paged_decode_splits_keys_evenly_across_threads(threads, lens):
    """Each thread takes an equal share of the keys: sequences cut at share boundaries (one sequence across
    several threads, a share ending exactly at a sequence's end, empty contexts) merge to the same output."""
    torch.manual_seed(3)
    heads, kv_heads, d, block_size = 9, 3, 64, 16
    lens = torch.tensor(lens)
    width = max(1, -(-int(lens.max()) // block_size))
    k_cache = torch.randn(width * len(lens) + 1, block_size, kv_heads, d)
    v_cache = torch.randn_like(k_cache)
    tables = torch.arange(width * len(lens)).view(len(lens), width).flip(1).contiguous()
    q = torch.randn(len(lens), heads, d)
    want = kernels.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.paged_decode(q, k_cache, v_cache, tables, lens, 0.125, 0)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_matches_torch(dtype):
    torch.manual_seed(1)
    T, heads, kv_heads, d, slots = 6, 4, 2, 16, 32
    qkv = torch.randn(T, (heads + 2 * kv_heads) * d).to(dtype)
    angles = torch.rand(T, d // 2) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slot_mapping = torch.randperm(slots)[:T]
    k_cache = torch.zeros(slots // 4, 4, kv_heads, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    want_qk = apply_rope(qkv[:, : (heads + kv_heads) * d].view(T, -1, d), cos[:, None], sin[:, None])
    want_k = torch.zeros_like(k_cache).view(-1, kv_heads, d)
    want_k[slot_mapping] = want_qk[:, heads:]
    want_v = torch.zeros_like(v_cache).view(-1, kv_heads, d)
    want_v[slot_mapping] = qkv[:, (heads + kv_heads) * d :].view(T, kv_heads, d)
    native.rope_and_cache(qkv, cos, sin, slot_mapping, k_cache, v_cache, heads, kv_heads)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * d].view(T, -1, d).float(), want_qk.float(), **TOL[dtype])
    torch.testing.assert_close(k_cache.view(-1, kv_heads, d).float(), want_k.float(), **TOL[dtype])
    torch.testing.assert_close(v_cache.view(-1, kv_heads, d), want_v, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype):
    torch.manual_seed(2)
    x, w = torch.randn(7, 96).to(dtype), torch.randn(96).to(dtype)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5).float(), kernels.rms_norm(x, w, 1e-5).float(), **TOL[dtype])


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    torch.manual_seed(3)
    gate_up = torch.randn(5, 2 * 85).to(dtype) * 4  # 5 vectors of 16 and a tail
    want = kernels.silu_mul(gate_up.clone())
    torch.testing.assert_close(native.silu_mul(gate_up).float(), want.float(), **TOL[dtype])


@needs_native
def test_argmax_matches_torch():
    """The first maximum of each row, NaN counting as the maximum; rows narrower than a vector, a tail."""
    torch.manual_seed(6)
    for width in (1, 7, 16, 33, 50, 49152, 49155):
        x = torch.randn(9, width)
        x[1] = 0.5  # all tied: index 0
        x[2] = float("-inf")
        x[3, width // 2] = float("nan")  # NaN in the vector part, or alone
        x[4, -1] = float("nan")  # NaN in the tail
        x[5, :] = -1.0
        x[5, [width - 1, width // 3]] = 3.0  # tied maxima in different lanes: the first
        x[6, width - 1] = 1e9  # the maximum in the tail
        assert torch.equal(native.argmax(x), kernels.argmax(x)), width
    assert native.argmax(torch.randn(0, 10)).shape == (0,)


def test_kernels_build_where_there_is_a_compiler():
    """A broken build falls back to torch ops at run time, and would skip the tests above: not here."""
    import shutil

    if shutil.which("c++") or shutil.which("g++"):
        assert native is not None, "the native kernels failed to build (see the warning logged above)"


@needs_native
def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_start():
    """cpp_extension waits forever on its `lock` file, even to load a finished build; one left behind by a
    process killed mid-build must be cleared by the next start, not block it."""
    import subprocess
    import sys

    stale = kernels.build_directory() / "lock"
    stale.touch()
    code = "from tokenwire.engine.models import kernels; assert kernels.native() is not None"
    done = subprocess.run([sys.executable, "-c", code], timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not stale.exists()


@needs_native
def test_the_build_names_no_path_of_this_checkout():
    """Built from a copy of the sources inside its own directory, so another checkout of the same sources
    (a worktree, CI's clone) loads this build instead of rebuilding it over and over."""
    from pathlib import Path

    build_dir = kernels.build_directory()
    ninja_file = (build_dir / "build.ninja").read_text()
    assert str(Path(kernels.__file__).resolve().parent) not in ninja_file
    assert str(build_dir / "src" / "cpu_linear.cpp") in ninja_file


def test_switched_off_by_config(tiny_llama_dir):
    from tokenwire.engine.config import EngineConfig
    from tokenwire.engine.worker.model_runner import ModelRunner

    assert ModelRunner(EngineConfig(model=tiny_llama_dir, native_kernels=False)).native is None


@needs_native
def test_the_flag_wins_over_the_environment(tiny_llama_dir, monkeypatch):
    """TOKENWIRE_NATIVE_KERNELS=0 is the flag's default, read once by the CLI: `--native-kernels` still
    turns them on (the kernels module read the variable again and overrode the flag)."""
    from tokenwire.engine.cli import build_parser, configs_from_args
    from tokenwire.engine.worker.model_runner import ModelRunner

    monkeypatch.setenv("TOKENWIRE_NATIVE_KERNELS", "0")
    by_env, _ = configs_from_args(build_parser().parse_args(["--model", tiny_llama_dir]))
    by_flag, _ = configs_from_args(build_parser().parse_args(["--model", tiny_llama_dir, "--native-kernels"]))
    assert not by_env.native_kernels and by_flag.native_kernels
    assert ModelRunner(by_env).native is None
    assert ModelRunner(by_flag).native is not None


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_gemv_matches_torch(dtype, rows):
    torch.manual_seed(4)
    for n, k in [(40, 64), (37, 96), (16, 50)]:  # whole tiles of 16 rows, a tail tile, a K tail
        x, w, b, r = (torch.randn(*shape).to(dtype) for shape in [(rows, k), (n, k), (n,), (rows, n)])
        for bias, residual in [(None, None), (b, None), (None, r), (b, r)]:
            want = kernels.gemv(x, w, bias, residual)
            got = native.gemv(x, w, bias, residual)
            assert got.dtype == dtype and got.shape == (rows, n)
            torch.testing.assert_close(got.float(), want.float(), **TOL.get(dtype, TOL[torch.bfloat16]))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_runs_few_rows_on_the_gemv(dtype):
    """linear.Linear: up to GEMV_MAX_ROWS rows on the GEMV (plain weight kept), more on oneDNN/F.linear."""
    from tokenwire.engine.models.linear import GEMV_MAX_ROWS, Linear

    torch.manual_seed(5)
    w, b = torch.randn(48, 64).to(dtype), torch.randn(48).to(dtype)
    fast, plain = Linear(w, b, gemv=native.gemv), Linear(w, b)
    assert fast.gemv_weight is w and plain.gemv_weight is None
    calls = []
    fast._gemv = lambda *args: calls.append(args[0].shape[0]) or native.gemv(*args)
    for rows in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x, residual = torch.randn(rows, 64).to(dtype), torch.randn(rows, 48).to(dtype)
        torch.testing.assert_close(fast(x).float(), plain(x).float(), **TOL[torch.bfloat16])
        torch.testing.assert_close(
            fast.add(x, residual.clone()).float(), plain.add(x, residual.clone()).float(), **TOL[torch.bfloat16]
        )
    assert calls == [1, 1, GEMV_MAX_ROWS, GEMV_MAX_ROWS]


def _runner_logits(
    model_dir,
    dtype: str,
    step: str,
    native_kernels: bool = True,
    fused_decode: bool = True,
    kv_cache_dtype: str = "auto",
    few_row_gemv: bool = True,
):
    """Prefill a few prompts, then one step: decodes with a prefill chunk over cached context ("mixed",
    the Python layer loop over the kernels), or decodes alone (every layer in one native call)."""
    from tokenwire.engine.config import CacheConfig, EngineConfig
    from tokenwire.engine.scheduling.sequence import ScheduledChunk
    from tokenwire.engine.worker.model_runner import ModelRunner

    from tests.test_model_runner import BLOCK_SIZE, contiguous_tables, make_seqs

    runner = ModelRunner(
        EngineConfig(
            model=model_dir,
            dtype=dtype,
            native_kernels=native_kernels,
            few_row_gemv=few_row_gemv,
            cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=256, kv_cache_dtype=kv_cache_dtype),
        )
    )
    assert (
        runner.kv_cache.k.dtype
        == runner.kv_cache.v.dtype
        == getattr(torch, dtype if kv_cache_dtype == "auto" else kv_cache_dtype)
    )
    if native_kernels:  # every layer in one native call wherever oneDNN packs the dtype (not bf16 on AVX2)
        assert (runner.model._decode_weights is not None) == onednn_works(getattr(torch, dtype))
    if not fused_decode:
        runner.model._decode_weights = runner.model._small_decode_weights = None
    # 19 decodes run their GEMMs at 32 rows (linear.gemm_rows), zero rows past the real ones; 3 decodes
    # run them on the GEMV, one decode of a float32 model on MKL's sgemv (both on the plain weights).
    lengths = {"decodes-padded": range(3, 22), "decode-one": (9,)}.get(step, (3, 9, 21))
    prompts = [list(range(5, 5 + n)) for n in lengths]
    seqs = make_seqs(prompts, contiguous_tables(prompts, 4))
    runner.execute([ScheduledChunk(s, 0, s.num_tokens - 2, False) for s in seqs])
    if step == "mixed":
        chunks = [ScheduledChunk(s, s.num_tokens - 2, 1, True) for s in seqs[:2]]
        chunks.append(ScheduledChunk(seqs[2], seqs[2].num_tokens - 2, 2, True))  # prefill over cached context
    else:
        runner.execute([ScheduledChunk(s, s.num_tokens - 2, 1, False) for s in seqs])
        chunks = [ScheduledChunk(s, s.num_tokens - 1, 1, True) for s in seqs]
    return runner.execute(chunks)


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("step", ["decode-one", "decodes"])
def test_few_row_gemv_switched_off_keeps_one_weight_copy(tiny_llama_dir, dtype, step):
    """`few_row_gemv=False`: every linear keeps its oneDNN-packed weight alone (no plain copy, so the
    linear layers' memory once), and steps of 1 and 3 decodes give the logits of the few-row path."""
    from tokenwire.engine.config import EngineConfig
    from tokenwire.engine.worker.model_runner import ModelRunner

    def linears(runner):
        return [lin for layer in runner.model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    off = ModelRunner(EngineConfig(model=tiny_llama_dir, dtype=dtype, few_row_gemv=False))
    # One copy: the packed weight where oneDNN packs the dtype, else the plain one F.linear reads.
    packs = onednn_works(getattr(torch, dtype))
    for lin in linears(off):
        assert lin.gemv_weight is None and (lin.packed is not None, lin.weight is not None) == (packs, not packs)
    assert off.model._small_decode_weights is None and (off.model._decode_weights is not None) == packs
    on = ModelRunner(EngineConfig(model=tiny_llama_dir, dtype=dtype))
    assert all(lin.gemv_weight is not None for lin in linears(on))
    got = _runner_logits(tiny_llama_dir, dtype, step, few_row_gemv=False)
    want = _runner_logits(tiny_llama_dir, dtype, step)
    assert got.shape == want.shape == (1 if step == "decode-one" else 3, want.shape[1])
    torch.testing.assert_close(got, want, **FORWARD_TOL[getattr(torch, dtype)])


@needs_native
@pytest.mark.parametrize("step", ["mixed", "decodes"])
def test_a_bfloat16_kv_cache_under_a_float32_model(tiny_llama_dir, step):
    """`kv_cache_dtype=bfloat16`: the fused layers, the Python loop over the kernels and torch's ops read the
    same rounded K/V (so agree as fp32 does); against the fp32 cache the logits move by the rounding only."""
    got = _runner_logits(tiny_llama_dir, "float32", step, kv_cache_dtype="bfloat16")
    python_loop = _runner_logits(tiny_llama_dir, "float32", step, fused_decode=False, kv_cache_dtype="bfloat16")
    torch_ops = _runner_logits(tiny_llama_dir, "float32", step, native_kernels=False, kv_cache_dtype="bfloat16")
    exact_cache = _runner_logits(tiny_llama_dir, "float32", step)
    torch.testing.assert_close(got, python_loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, torch_ops, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, exact_cache)
    torch.testing.assert_close(got, exact_cache, rtol=0.05, atol=0.1)


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("step", ["mixed", "decodes", "decodes-padded"])
def test_runner_with_and_without_native_kernels_agree(tiny_llama_dir, dtype, step):
    """The whole forward with the kernels (from C++ or from Python) and with torch ops alone (which
    also means oneDNN for every GEMM, never the GEMV)."""
    got = _runner_logits(tiny_llama_dir, dtype, step)
    python_loop = _runner_logits(tiny_llama_dir, dtype, step, fused_decode=False)
    torch_ops = _runner_logits(tiny_llama_dir, dtype, step, native_kernels=False)
    assert got.shape == (3 if step != "decodes-padded" else 19, torch_ops.shape[1])
    # The same kernels from C++ or from Python: the same numbers.
    torch.testing.assert_close(got, python_loop, rtol=1e-5, atol=1e-5)
    # Against the torch ops: bf16 rounds at different places (attention, norms, GEMV sums) on the two paths.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=0.1, atol=0.25)
    torch.testing.assert_close(got, torch_ops, **tol)

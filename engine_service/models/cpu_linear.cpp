// A GEMV for the few-row GEMMs (see cpu_kernels.cpp for the build and the ops).
//
// gemv: y = x @ W^T (+ bias) (+ residual) for x of a few rows, reading the plain [N, K] weight once at
// memory speed. At one row (a single stream's decode) a GEMM is a pass over the weights, and oneDNN's
// prepacked bf16 GEMM reads them at 12-14 GB/s on Xeons with and without AMX; this loop, which widens
// bf16 to float by a shift and prefetches 2 KB ahead into L1, reads them at 21 GB/s (the machine streams
// 20.5): SmolLM2-135M's 121 GEMMs of a token in 12.6 ms instead of 19.2. In float32 oneDNN's prepacked
// GEMM pays 50-80 us per call at these sizes (its 2-7 MB weights at 9-16 GB/s; 30 distinct layers, 2 Xeon
// cores): this loop reads them at 17-23 GB/s for 2-4 rows, and for one row MKL's sgemv (at::addmm on
// the same plain weight), at 19-26 GB/s, beats both, so one float32 row goes there.
#include "cpu_kernels.h"

namespace {

using tokenwire_kernels::grain;
using vec::v16;

constexpr int64_t kRowsPerTile = 16;   // weight rows per tile: their 16 dot products fill one vector
constexpr int64_t kPrefetchBytes = 2048;

// Dot products of weight row w (K wide) with the M rows of xf (float32, K wide each): M vectors of
// partial sums, still to be summed across lanes. The weight row is read once for all M rows.
template <typename T, int M>
inline void row_dots(const T* w, const float* xf, int64_t K, v16* out) {
  v16 a[M] = {}, b[M] = {};
  int64_t c = 0;
  for (; c + 32 <= K; c += 32) {
    // Every cache line of this step's 32 weights: one in bf16, two in fp32 (one prefetch a step read fp32 5-10% slower).
    for (size_t line = 0; line < 32 * sizeof(T); line += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes + line, 0, 3);
    const v16 w0 = vec::load(w + c), w1 = vec::load(w + c + 16);
    for (int i = 0; i < M; ++i) {
      a[i] += vec::load(xf + i * K + c) * w0;
      b[i] += vec::load(xf + i * K + c + 16) * w1;
    }
  }
  for (; c + 16 <= K; c += 16) {
    const v16 w0 = vec::load(w + c);
    for (int i = 0; i < M; ++i) a[i] += vec::load(xf + i * K + c) * w0;
  }
  for (int i = 0; i < M; ++i) out[i] = a[i] + b[i];
  for (; c < K; ++c)  // a K that is not a multiple of 16: the rest, lane 0
    for (int i = 0; i < M; ++i) out[i][0] += xf[i * K + c] * static_cast<float>(w[c]);
}

template <typename T, int M>
void gemv_impl(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
               const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  const int64_t N = w.size(0), K = w.size(1), tiles = (N + kRowsPerTile - 1) / kRowsPerTile;
  const T* wp = w.data_ptr<T>();
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const int64_t r_row = residual ? residual->stride(0) : 0;
  T* op = out.data_ptr<T>();
  // x widened to M x K floats once (by hand: an ATen conversion cost 5 us per call, 0.6 ms per token),
  // then read from L1 by every tile.
  std::vector<float> xf_rows(M * K);
  float* xf = xf_rows.data();
  const T* xp = x.data_ptr<T>();
  for (int i = 0; i < M; ++i) {
    const T* row = xp + i * x.stride(0);
    int64_t c = 0;
    for (; c + 16 <= K; c += 16) vec::store(xf + i * K + c, vec::load(row + c));
    for (; c < K; ++c) xf[i * K + c] = static_cast<float>(row[c]);
  }
  at::parallel_for(0, tiles, grain(kRowsPerTile * K * M), [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kRowsPerTile, rows = std::min(kRowsPerTile, N - n0);
      v16 partial[M][kRowsPerTile];
      for (int64_t j = 0; j < kRowsPerTile; ++j) {
        v16 dots[M];
        if (j < rows) row_dots<T, M>(wp + (n0 + j) * K, xf, K, dots);
        for (int i = 0; i < M; ++i) partial[i][j] = j < rows ? dots[i] : v16{};
      }
      for (int i = 0; i < M; ++i) {
        v16 y = vec::transpose_sum(partial[i]);
        float yt[kRowsPerTile];
        vec::store(yt, y);
        for (int64_t j = 0; j < rows; ++j) {  // bias and residual in float, one rounding to T
          float v = yt[j];
          if (bp) v += static_cast<float>(bp[n0 + j]);
          if (rp) v += static_cast<float>(rp[i * r_row + n0 + j]);
          op[i * N + n0 + j] = static_cast<T>(v);
        }
      }
    }
  });
}

template <typename T>
void gemv_rows(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
               const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  switch (x.size(0)) {
    case 1: return gemv_impl<T, 1>(x, w, bias, residual, out);
    case 2: return gemv_impl<T, 2>(x, w, bias, residual, out);
    case 3: return gemv_impl<T, 3>(x, w, bias, residual, out);
    case 4: return gemv_impl<T, 4>(x, w, bias, residual, out);
    default: TORCH_CHECK(false, "gemv: at most ", kGemvMaxRows, " rows, got ", x.size(0));
  }
}

// One float32 row through MKL's sgemv, the residual (or the bias) as addmm's input: see the header.
torch::Tensor sgemv_row(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                        const std::optional<torch::Tensor>& residual) {
  const torch::Tensor wt = w.t();
  if (residual) {
    torch::Tensor y = at::addmm(*residual, x, wt);
    return bias ? y.add_(*bias) : y;
  }
  return bias ? at::addmm(*bias, x, wt) : at::mm(x, wt);
}

}  // namespace

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> bias,
                   std::optional<torch::Tensor> residual) {
  tokenwire_kernels::check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "gemv: x [m, K] with contiguous rows");
  const bool quantized = w.dim() == 3;  // blocks of cpu_quant.cpp
  TORCH_CHECK(quantized || (w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1)), "gemv: w [N, K] contiguous");
  TORCH_CHECK(quantized || w.scalar_type() == x.scalar_type(), "gemv: w dtype");
  const int64_t n = quantized ? quant_out_features(w) : w.size(0);
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == x.scalar_type(), "gemv: bias");
  if (residual) TORCH_CHECK(residual->dim() == 2 && residual->size(0) == x.size(0) && residual->size(1) == n &&
                            residual->stride(1) == 1 && residual->scalar_type() == x.scalar_type(), "gemv: residual");
  if (quantized) return quant_gemv(x, w, bias, residual);
  if (x.scalar_type() == at::kFloat && x.size(0) == 1) return sgemv_row(x, w, bias, residual);
  auto out = tokenwire_kernels::new_output({x.size(0), w.size(0)}, x.scalar_type());
  if (x.size(0) == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat: gemv_rows<float>(x, w, bias, residual, out); break;
    case at::kBFloat16: gemv_rows<c10::BFloat16>(x, w, bias, residual, out); break;
    case at::kHalf: gemv_rows<c10::Half>(x, w, bias, residual, out); break;
    default: TORCH_CHECK(false, "gemv: float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(tokenwire, m) {
  m.def("gemv(Tensor x, Tensor w, Tensor? bias, Tensor? residual) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenwire, CPU, m) {
  m.impl("gemv", &gemv);
}

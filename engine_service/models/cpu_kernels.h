// Shared by the native CPU kernels' sources (see cpu_kernels.cpp): 16-float vectors, a vectorizable
// exp, and the ops that the fused decode layers (cpu_decode.cpp) call directly.
#pragma once
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace vec {
// 16 floats. GCC's vector extensions: -march=native lowers them to one AVX-512 register or two AVX2 ones.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

inline v16 load(const float* p) { v16 r; std::memcpy(&r, p, sizeof(r)); return r; }
inline v16 load(const c10::BFloat16* p) {  // bf16 is the high half of a float
#if defined(__AVX512F__)  // one widening move (GCC split the generic conversion into two 8-lane halves)
  const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  v16 out; std::memcpy(&out, &w, sizeof(out)); return out;
#else
  v16h h; std::memcpy(&h, p, sizeof(h));
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16 r; std::memcpy(&r, &u, sizeof(r)); return r;
#endif
}
inline v16 load(const c10::Half* p) {
#if defined(__AVX512F__)
  const __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  v16 out; std::memcpy(&out, &r, sizeof(out)); return out;
#else
  float t[16];
  for (int i = 0; i < 16; ++i) t[i] = static_cast<float>(p[i]);
  return load(t);
#endif
}
// Round to the nearest bfloat16 (ties to even), kept as a float: what storing to bf16 and loading does.
inline v16 round_bf16(v16 x) {
  v16u u; std::memcpy(&u, &x, sizeof(u));
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  v16 r; std::memcpy(&r, &u, sizeof(r)); return r;
}
inline void store(float* p, v16 x) { std::memcpy(p, &x, sizeof(x)); }
inline void store(c10::BFloat16* p, v16 x) {
  v16u u; std::memcpy(&u, &x, sizeof(u));
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
#if defined(__AVX512F__)  // one narrowing move (GCC used a two-register word permute)
  __m512i w; std::memcpy(&w, &u, sizeof(w));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(w));
#else
  const v16h h = __builtin_convertvector(u, v16h);
  std::memcpy(p, &h, sizeof(h));
#endif
}
inline void store(c10::Half* p, v16 x) {
  for (int i = 0; i < 16; ++i) p[i] = static_cast<c10::Half>(x[i]);
}
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// Sums of 16 vectors in one: lane j = horizontal sum of x[j], for the 16 keys of a tile.
#if defined(__AVX512F__)
// A shuffle-add tree (15 two-vector steps for 16 sums instead of a full horizontal reduction per
// vector); its output order is bit-reversed, so the inputs are taken in bit-reversed order.
inline v16 combine(v16 a, v16 b, v16i lo, v16i hi) {
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}
inline v16 transpose_sum(const v16* x) {
  static constexpr int rev[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  const v16i l1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const v16i l2 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const v16i h2 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const v16i l3 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const v16i h3 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const v16i l4 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const v16i h4 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  v16 a[8], b[4], c[2];
  for (int k = 0; k < 8; ++k) a[k] = combine(x[rev[2 * k]], x[rev[2 * k + 1]], l1, h1);
  for (int k = 0; k < 4; ++k) b[k] = combine(a[2 * k], a[2 * k + 1], l2, h2);
  for (int k = 0; k < 2; ++k) c[k] = combine(b[2 * k], b[2 * k + 1], l3, h3);
  return combine(c[0], c[1], l4, h4);
}
#elif defined(__AVX__)
// Without AVX-512 GCC lowers 16-lane two-vector shuffles to scalar inserts: fold each vector to 8 lanes,
// then the classic hadd transpose of 8 x 8.
inline __m256 transpose_sum8(const __m256* y) {
  const __m256 t0 = _mm256_hadd_ps(y[0], y[1]), t1 = _mm256_hadd_ps(y[2], y[3]);
  const __m256 t2 = _mm256_hadd_ps(y[4], y[5]), t3 = _mm256_hadd_ps(y[6], y[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
inline v16 transpose_sum(const v16* x) {
  __m256 folded[16];
  for (int j = 0; j < 16; ++j) {
    __m256 lo, hi;
    std::memcpy(&lo, &x[j], sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&x[j]) + sizeof(lo), sizeof(hi));
    folded[j] = _mm256_add_ps(lo, hi);
  }
  const __m256 first = transpose_sum8(folded), second = transpose_sum8(folded + 8);
  v16 r;
  std::memcpy(&r, &first, sizeof(first));
  std::memcpy(reinterpret_cast<char*>(&r) + sizeof(first), &second, sizeof(second));
  return r;
}
#else
inline v16 transpose_sum(const v16* x) {
  v16 r = {};
  for (int j = 0; j < 16; ++j)
    for (int l = 0; l < 16; ++l) r[j] += x[j][l];
  return r;
}
#endif
}  // namespace vec

namespace tokenwire_kernels {

template <typename T>
inline float f(T x) { return static_cast<float>(x); }

// A kernel's output, allocated without a dispatcher call: torch::empty costs one (about a microsecond, and
// under torch.profiler an aten::empty event for every kernel call, 120 per decode step of the default model).
inline torch::Tensor new_output(c10::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
}

// A KV cache narrower than a float32 model (CacheConfig.kv_cache_dtype): half the bytes for attention to read.
inline bool narrow_kv(const torch::Tensor& cache) {
  return cache.scalar_type() == at::kBFloat16 || cache.scalar_type() == at::kHalf;
}

inline void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// Items per parallel chunk so that each chunk has about at::internal::GRAIN_SIZE elements of work: a
// small model's ops then stay on one thread, where waking the other (OMP_WAIT_POLICY=PASSIVE, as the
// engine service runs) costs more than the op (a soak of the tiny test model ran 2.5x slower).
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

// expf by Cephes' range reduction and polynomial (about 1 ulp), for a float or 16 lanes at once: plain
// arithmetic, so scalar loops over it vectorize (std::exp stays a scalar libm call without -ffast-math).
// Clamped to [-87, 88]: exp(-87) ~ 1.6e-38 stays a normal float.
inline float broadcast(float x, float) { return x; }
inline vec::v16 broadcast(float x, vec::v16) { return vec::splat(x); }
inline int32_t truncate(float x) { return static_cast<int32_t>(x); }
inline vec::v16i truncate(vec::v16 x) { return __builtin_convertvector(x, vec::v16i); }
inline float to_float(int32_t x) { return static_cast<float>(x); }
inline vec::v16 to_float(vec::v16i x) { return __builtin_convertvector(x, vec::v16); }

template <typename F>
inline F fast_exp(F x) {
  const F lo = broadcast(-87.0f, x), hi = broadcast(88.0f, x);
  x = x < lo ? lo : x;  // selects, not branches (with -fno-trapping-math)
  x = x > hi ? hi : x;
  // round(x / ln 2); the offset keeps the argument positive so truncation is floor.
  const auto ni = truncate(x * 1.44269504088896341f + 128.5f) - 128;
  const F n = to_float(ni);
  const F r = x - n * 0.693359375f + n * 2.12194440e-4f;
  F p = broadcast(1.9875691500e-4f, x);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const auto bits = (ni + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace tokenwire_kernels

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                           torch::Tensor lens, double scale, int64_t window);
void rope_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                    torch::Tensor k_cache, torch::Tensor v_cache, int64_t num_heads, int64_t num_kv_heads);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
// The most rows gemv (cpu_linear.cpp) takes; device.GEMV_MAX_ROWS mirrors it.
constexpr int64_t kGemvMaxRows = 4;
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> bias,
                   std::optional<torch::Tensor> residual);
// gemv over quantized weight blocks (cpu_quant.cpp): the same contract, w a 3-D block tensor.
torch::Tensor quant_gemv(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                         const std::optional<torch::Tensor>& residual);
// The output features of a quantized block tensor (16 per row of q4 tiles, else one).
int64_t quant_out_features(const torch::Tensor& w);

// CPU kernels for the model forward, built on first use by torch.utils.cpp_extension (see kernels.py), and
// the registration of every op of the extension (torch.ops.tokenwire.*).
//
// Each kernel replaces a run of small aten ops with one pass over memory:
// - rope_and_cache: rotates q and k in place inside the fused qkv output and writes k and v into their
//   cache slots;
// - rms_norm: fused, rounding to the model dtype where transformers does;
// - argmax: greedy sampling's argmax over the logits at memory speed;
// - paged_decode (cpu_attention.cpp): decode attention reading the paged KV cache in place;
// - silu_mul and decode_layers (cpu_decode.cpp): SiLU*mul, and every decoder layer of a decode-only step.
// - gemv (cpu_linear.cpp): the few-row GEMMs at memory speed.
// Math is in float32 whatever the storage dtype; work is split with at::parallel_for (torch's threads);
// shared helpers are in cpu_kernels.h.
#include "cpu_kernels.h"

namespace {

using tokenwire_kernels::check_cpu;
using tokenwire_kernels::narrow_kv;
using tokenwire_kernels::new_output;
using tokenwire_kernels::f;
using tokenwire_kernels::grain;

// qkv [T, (H + 2 * kvh) * d] contiguous rows; cos/sin [T, d/2] (float32 or the model dtype). q and k
// are rotated in place (HF's rotate_half convention), then k and v rows go to cache slots `slots[t]`,
// rounded to the cache's dtype KV where it is narrower.
template <typename T, typename C, typename KV = T>
void rope_and_cache_impl(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                         const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache,
                         int64_t H, int64_t kvh, int64_t d) {
  const int64_t T_ = qkv.size(0), row = qkv.stride(0), half = d / 2;
  T* xp = qkv.data_ptr<T>();
  const C* cp = cos.data_ptr<C>();
  const C* sp = sin.data_ptr<C>();
  const int64_t cs_row = cos.stride(0);
  const int64_t* slot = slots.data_ptr<int64_t>();
  KV* kc = k_cache.data_ptr<KV>();
  KV* vc = v_cache.data_ptr<KV>();
  const int64_t slot_stride = kvh * d;
  at::parallel_for(0, T_, grain((H + 3 * kvh) * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* x = xp + t * row;
      const C* c = cp + t * cs_row;
      const C* s = sp + t * cs_row;
      for (int64_t head = 0; head < H + kvh; ++head) {
        T* x1 = x + head * d;
        T* x2 = x1 + half;
#if defined(__AVX512F__)
        if constexpr (!std::is_same_v<T, double> && !std::is_same_v<C, double>) {
          if (half % 16 == 0) {  // bf16 <-> float conversions do not vectorize as scalars: 16 lanes by hand
            for (int64_t i = 0; i < half; i += 16) {
              const vec::v16 a = vec::load(x1 + i), b = vec::load(x2 + i), ci = vec::load(c + i), si = vec::load(s + i);
              vec::store(x1 + i, a * ci - b * si);
              vec::store(x2 + i, b * ci + a * si);
            }
            continue;
          }
        }
#endif
        for (int64_t i = 0; i < half; ++i) {
          const float a = f(x1[i]), b = f(x2[i]), ci = f(c[i]), si = f(s[i]);
          x1[i] = static_cast<T>(a * ci - b * si);
          x2[i] = static_cast<T>(b * ci + a * si);
        }
      }
      std::copy(x + H * d, x + (H + kvh) * d, kc + slot[t] * slot_stride);
      std::copy(x + (H + kvh) * d, x + (H + 2 * kvh) * d, vc + slot[t] * slot_stride);
    }
  });
}

inline void rms_norm_row_bf16(const c10::BFloat16* x, const c10::BFloat16* w, int64_t D, float eps,
                              c10::BFloat16* out) {
  vec::v16 acc = {};
  for (int64_t i = 0; i < D; i += 16) {
    const vec::v16 v = vec::load(x + i);
    acc += v * v;
  }
  float ss = 0.f;
  for (int j = 0; j < 16; ++j) ss += acc[j];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; i += 16)
    vec::store(out + i, vec::load(w + i) * vec::round_bf16(vec::load(x + i) * r));
}

// y = w * cast(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm rounds it. x [T, D] rows.
template <typename T>
void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& w, double eps, torch::Tensor& out) {
  const int64_t T_ = x.size(0), D = x.size(1), row = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, T_, grain(2 * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* xr = xp + t * row;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (D % 16 == 0) {  // bf16 <-> float conversions do not vectorize as scalars: 16 lanes by hand
          rms_norm_row_bf16(xr, wp, D, static_cast<float>(eps), op + t * D);
          continue;
        }
      }
#endif
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += f(xr[i]) * f(xr[i]);
      const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      T* o = op + t * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(f(wp[i]) * f(static_cast<T>(f(xr[i]) * r)));
    }
  });
}

// The index of the first NaN among x[0, V), called only where one was seen.
int64_t first_nan(const float* x, int64_t V) {
  for (int64_t j = 0; j < V; ++j) if (std::isnan(x[j])) return j;
  return V;
}

// argmax_row: the index of the first maximum of a row of V floats, NaN counting as the maximum as in
// torch.argmax, which reads the logits of a batch-32 step (6 MB) in 1.2 ms on 2 Xeon cores, a tenth of
// memory speed.
#if defined(__AVX2__) && !defined(__AVX512F__)
// Without AVX-512 the 16-lane select of the other branch ran 1.5-2.4x slower than torch.argmax (2-core AMD EPYC,
// 32 x 262,144: 12.3 vs 5.1 ms): a max pass (four 8-lane accumulators), then a pass that finds the
// first index holding it, while the row is still in cache.
int64_t argmax_row(const float* x, int64_t V) {
  const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest, unordered = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= V; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    unordered = _mm256_or_ps(unordered, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a), m1 = _mm256_max_ps(m1, b), m2 = _mm256_max_ps(m2, c), m3 = _mm256_max_ps(m3, d);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  float m = *std::max_element(lanes, lanes + 8);
  bool any_nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t j = i; j < V; ++j) {
    any_nan |= std::isnan(x[j]);
    m = x[j] > m ? x[j] : m;
  }
  if (any_nan) return first_nan(x, V);
  const __m256 target = _mm256_set1_ps(m);
  int64_t j = 0;
  for (; j + 8 <= V; j += 8) {
    const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
    if (hits) return j + __builtin_ctz(hits);
  }
  for (; j < V; ++j) if (x[j] == m) return j;
  return 0;  // unreachable: m is one of the row's values
}
#else
// 16 lanes that each keep their best value and its index: 0.15 ms for that batch-32 step.
int64_t argmax_row(const float* x, int64_t V) {
  using vec::v16;
  using vec::v16i;
  v16 best = vec::splat(-std::numeric_limits<float>::infinity());
  v16i at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, idx = at, nan = {};
  int64_t i = 0;
  for (; i + 16 <= V; i += 16, idx += 16) {
    const v16 v = vec::load(x + i);
    const v16i better = v > best;  // strict: each lane keeps the first index of its maximum
    best = better ? v : best;
    at = better ? idx : at;
    nan |= v != v;
  }
  bool any_nan = false;
  for (int l = 0; l < 16; ++l) any_nan |= nan[l] != 0;
  if (any_nan) return first_nan(x, i);
  float m = i > 0 ? best[0] : x[0];
  int64_t arg = i > 0 ? at[0] : 0;
  for (int l = 1; l < 16 && i > 0; ++l)
    if (best[l] > m || (best[l] == m && at[l] < arg)) { m = best[l]; arg = at[l]; }
  for (int64_t j = i; j < V; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > m) { m = x[j]; arg = j; }
  }
  return arg;
}
#endif

}  // namespace

torch::Tensor argmax(torch::Tensor x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat, "argmax: float32 [n, V] rows");
  TORCH_CHECK(x.size(1) > 0 && x.size(1) < (int64_t{1} << 31), "argmax: 0 < V < 2^31");
  auto out = new_output({x.size(0)}, torch::kLong);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t V = x.size(1), row = x.stride(0);
  at::parallel_for(0, x.size(0), grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * row, V);
  });
  return out;
}

void rope_and_cache(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                    torch::Tensor k_cache, torch::Tensor v_cache, int64_t num_heads, int64_t num_kv_heads) {
  check_cpu(qkv, "qkv");
  const int64_t d = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * d, "qkv shape");
  TORCH_CHECK(cos.dim() == 2 && cos.stride(1) == 1 && cos.size(1) == d / 2 && cos.size(0) == qkv.size(0), "cos shape");
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.strides() == cos.strides() && sin.scalar_type() == cos.scalar_type(), "sin");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type(),
              "caches: contiguous, one dtype");
  slots = slots.to(torch::kLong).contiguous();
  TORCH_CHECK(slots.numel() == qkv.size(0), "slots");
  if (k_cache.scalar_type() != qkv.scalar_type()) {  // a narrower cache under a float32 model
    TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && narrow_kv(k_cache),
                "caches: qkv's dtype, or bfloat16/float16 under float32 qkv; got ", k_cache.scalar_type());
    if (k_cache.scalar_type() == at::kBFloat16) {
      rope_and_cache_impl<float, float, c10::BFloat16>(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads, d);
    } else {
      rope_and_cache_impl<float, float, c10::Half>(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads, d);
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_and_cache", [&] {
    if (cos.scalar_type() == at::kFloat) {
      rope_and_cache_impl<scalar_t, float>(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads, d);
    } else {
      TORCH_CHECK(cos.scalar_type() == qkv.scalar_type(), "cos/sin: float32 or the qkv dtype");
      rope_and_cache_impl<scalar_t, scalar_t>(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads, d);
    }
  });
}

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.is_contiguous() && w.numel() == x.size(1), "rms_norm shapes");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "rms_norm: weight dtype");
  auto out = new_output(x.sizes(), x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(x, w, eps, out);
  });
  return out;
}

// Registered as torch ops (torch.ops.tokenwire.*): the profiler sees and times them like aten ops.
TORCH_LIBRARY(tokenwire, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor tables, Tensor lens, float scale, "
        "int window) -> Tensor");
  m.def("rope_and_cache(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor slots, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, int num_heads, int num_kv_heads) -> ()");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenwire, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("rms_norm", &rms_norm);
  m.impl("argmax", &argmax);
}

// CPU kernels for the model forward, built on first use by torch.utils.cpp_extension (see kernels.py).
//
// Each one replaces a run of small aten ops with one pass over memory:
// - paged_decode: one query per sequence attends over its KV blocks where they lie in the paged cache
//   (no gather), grouped-query heads sharing each K/V row read;
// - rope_and_cache: rotates q and k in place inside the fused qkv output and writes k and v into their
//   cache slots;
// - rms_norm: fused, rounding to the model dtype where transformers does.
// (A fused SiLU*mul did not pay: torch's two vectorized in-place ops were faster than gcc's loop.)
// Math is in float32 whatever the storage dtype; work is split with at::parallel_for (torch's threads).
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float f(T x) { return static_cast<float>(x); }

// Items per parallel chunk so that each chunk has about at::internal::GRAIN_SIZE elements of work: a
// small model's ops then stay on one thread, where waking the other (OMP_WAIT_POLICY=PASSIVE, as the
// engine service runs) costs more than the op (a soak of the tiny test model ran 2.5x slower).
inline int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

// expf by Cephes' range reduction and polynomial (about 1 ulp): plain arithmetic, so loops over it
// vectorize (std::exp stays a scalar libm call without -ffast-math).
// Clamped to [-87, 88]: exp(-87) ~ 1.6e-38 stays a normal float.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // selects, not branches (with -fno-trapping-math)
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln 2); the offset keeps the argument positive so truncation is floor.
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += q[i] * f(k[i]);
  return acc;
}

// q [n, H, d] (rows may be strided), caches [blocks, block_size, kv_heads, d], tables [n, max_blocks],
// lens [n] (keys 0..len-1 are visible; with window > 0 only the last `window` of them). out [n, H * d].
template <typename T>
void paged_decode_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const torch::Tensor& tables, const torch::Tensor& lens, double scale, int64_t window,
                       torch::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), kvh = k_cache.size(2);
  const int64_t group = H / kvh, max_blocks = tables.size(1);
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t slot_stride = kvh * d;
  int64_t total_len = 0;
  for (int64_t s = 0; s < n; ++s) total_len += lp[s];
  const int64_t work_per_task = 2 * group * d * (n > 0 ? total_len / n + 1 : 1);  // K and V rows read
  at::parallel_for(0, n * kvh, grain(work_per_task), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), acc(group * d), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, h = task % kvh;
      const int64_t len = lp[s];
      const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t count = len - lo;
      scores.resize(group * count);
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < d; ++i)
          qf[g * d + i] = f(qp[s * q_row + (h * group + g) * q_head + i]) * static_cast<float>(scale);
      const int64_t* table = tp + s * max_blocks;
      // Block by block (no integer division per key): a key row is read once for the whole group.
      for (int64_t t = lo, blk = lo / block_size, off = lo % block_size; t < len; ++t) {
        const T* krow = kp + (table[blk] * block_size + off) * slot_stride + h * d;
        for (int64_t g = 0; g < group; ++g) scores[g * count + (t - lo)] = dot(qf.data() + g * d, krow, d);
        if (++off == block_size) { off = 0; ++blk; }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::vector<float> total(group, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * count;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < count; ++j) mx = std::max(mx, sc[j]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < count; ++j) { sc[j] = fast_exp(sc[j] - mx); sum += sc[j]; }
        total[g] = sum;
      }
      for (int64_t t = lo, blk = lo / block_size, off = lo % block_size; t < len; ++t) {
        const T* vrow = vp + (table[blk] * block_size + off) * slot_stride + h * d;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * count + (t - lo)];
          float* a = acc.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) a[i] += p * f(vrow[i]);
        }
        if (++off == block_size) { off = 0; ++blk; }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = total[g] > 0.f ? 1.f / total[g] : 0.f;
        T* o = op + s * H * d + (h * group + g) * d;
        for (int64_t i = 0; i < d; ++i) o[i] = static_cast<T>(acc[g * d + i] * inv);
      }
    }
  });
}

// qkv [T, (H + 2 * kvh) * d] contiguous rows; cos/sin [T, d/2] (float32 or the model dtype). q and k
// are rotated in place (HF's rotate_half convention), then k and v rows go to cache slots `slots[t]`.
template <typename T, typename C>
void rope_and_cache_impl(torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                         const torch::Tensor& slots, torch::Tensor& k_cache, torch::Tensor& v_cache,
                         int64_t H, int64_t kvh, int64_t d) {
  const int64_t T_ = qkv.size(0), row = qkv.stride(0), half = d / 2;
  T* xp = qkv.data_ptr<T>();
  const C* cp = cos.data_ptr<C>();
  const C* sp = sin.data_ptr<C>();
  const int64_t cs_row = cos.stride(0);
  const int64_t* slot = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  const int64_t slot_stride = kvh * d;
  at::parallel_for(0, T_, grain((H + 3 * kvh) * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* x = xp + t * row;
      const C* c = cp + t * cs_row;
      const C* s = sp + t * cs_row;
      for (int64_t head = 0; head < H + kvh; ++head) {
        T* x1 = x + head * d;
        T* x2 = x1 + half;
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

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                           torch::Tensor lens, double scale, int64_t window) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q: [n, heads, head_dim] with contiguous head_dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches: contiguous 4-d");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), "dtype mismatch");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "head shapes");
  tables = tables.to(torch::kLong).contiguous();
  lens = lens.to(torch::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && lens.numel() == q.size(0), "tables/lens");
  auto out = torch::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    paged_decode_impl<scalar_t>(q, k_cache, v_cache, tables, lens, scale, window, out);
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
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == qkv.scalar_type(), "caches");
  slots = slots.to(torch::kLong).contiguous();
  TORCH_CHECK(slots.numel() == qkv.size(0), "slots");
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
  auto out = torch::empty(x.sizes(), x.options());
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
}

TORCH_LIBRARY_IMPL(tokenwire, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("rope_and_cache", &rope_and_cache);
  m.impl("rms_norm", &rms_norm);
}

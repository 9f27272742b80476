// The few-row GEMV over quantized weight blocks (quantized.py makes them; `gemv` sends 3-D weights here).
//
// q4: uint8 [N, K/32, 20]. Per 32 weights: fp16 d, fp16 m, 16 bytes of nibbles (byte j holds weight j in
//     its low nibble, weight j+16 in its high one); w = d*q + m. GGML's block_q4_1, which Q4_0 and Q4_K
//     are rewritten into at load.
// q8: int8 [N, K/G, 2+G], G 16 or 32. Per G weights: fp16 d, then G int8 q; w = d*q. GGML's block_q8_0 at
//     G = 32 (Q8_0, --quantization int8), Q6_K's 16-weight sub-blocks at G = 16.
//
// A step of one stream is a pass over the weights, so its speed is the bytes read: 0.625 bytes a weight in
// q4 against 2 in bf16. Each block is widened to float in registers and met by the activation rows
// (float, from L1): y = sum_b d_b * (q_b . x_b) + m_b * sum(x_b), summed in float, rounded once to x's dtype.
#include "cpu_kernels.h"

namespace {

using tokenwire_kernels::grain;
using vec::v16;

constexpr int64_t kRowsPerTile = 16;  // weight rows per tile: their 16 dot products fill one vector
constexpr int64_t kPrefetchBytes = 1024;

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; c10's portable conversion made the q4 GEMV 2x slower
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

inline v16 from_m512(const void* p) { v16 r; std::memcpy(&r, p, sizeof(r)); return r; }

// The 32 nibbles of a q4 block as floats: weights 0-15 in lo, 16-31 in hi.
inline void unpack_q4(const uint8_t* qs, v16& lo, v16& hi) {
#if defined(__AVX512F__)
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), mask = _mm_set1_epi8(0x0F);
  const __m512 l = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)));
  const __m512 h = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)));
  lo = from_m512(&l);
  hi = from_m512(&h);
#else
  float t[32];
  for (int j = 0; j < 16; ++j) {
    t[j] = static_cast<float>(qs[j] & 0x0F);
    t[j + 16] = static_cast<float>(qs[j] >> 4);
  }
  lo = vec::load(t);
  hi = vec::load(t + 16);
#endif
}

// 16 int8 weights as floats.
inline v16 unpack_q8(const uint8_t* qs) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs))));
  return from_m512(&f);
#else
  float t[16];
  for (int j = 0; j < 16; ++j) t[j] = static_cast<float>(static_cast<int8_t>(qs[j]));
  return vec::load(t);
#endif
}

// One weight row of q4 blocks against M activation rows: vector partial sums in acc (still to be summed
// across lanes) and the rows' m_b*sum(x_b) terms in msum.
template <int M>
inline void q4_row(const uint8_t* w, int64_t blocks, const float* xf, const float* xsum, int64_t K, v16* acc,
                   float* msum) {
  for (int i = 0; i < M; ++i) acc[i] = v16{}, msum[i] = 0.f;
  for (int64_t b = 0; b < blocks; ++b, w += 20) {
    __builtin_prefetch(w + kPrefetchBytes, 0, 3);
    const float d = half_at(w), m = half_at(w + 2);
    v16 lo, hi;
    unpack_q4(w + 4, lo, hi);
    for (int i = 0; i < M; ++i) {
      const float* x = xf + i * K + b * 32;
      acc[i] += vec::splat(d) * (lo * vec::load(x) + hi * vec::load(x + 16));
      msum[i] += m * xsum[i * blocks + b];
    }
  }
}

template <int G, int M>
inline void q8_row(const uint8_t* w, int64_t blocks, const float* xf, int64_t K, v16* acc) {
  for (int i = 0; i < M; ++i) acc[i] = v16{};
  for (int64_t b = 0; b < blocks; ++b, w += 2 + G) {
    __builtin_prefetch(w + kPrefetchBytes, 0, 3);
    const v16 d = vec::splat(half_at(w));
    const v16 q0 = unpack_q8(w + 2);
    if constexpr (G == 32) {
      const v16 q1 = unpack_q8(w + 18);
      for (int i = 0; i < M; ++i) {
        const float* x = xf + i * K + b * 32;
        acc[i] += d * (q0 * vec::load(x) + q1 * vec::load(x + 16));
      }
    } else {
      for (int i = 0; i < M; ++i) acc[i] += d * (q0 * vec::load(xf + i * K + b * 16));
    }
  }
}

// 0: q4, 16 or 32: q8 at that group size.
template <typename T, int M, int Q8Group>
void quant_gemv_impl(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                     const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  const int64_t N = w.size(0), blocks = w.size(1), row_bytes = blocks * w.size(2), K = x.size(1);
  const int64_t tiles = (N + kRowsPerTile - 1) / kRowsPerTile;
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const int64_t r_row = residual ? residual->stride(0) : 0;
  T* op = out.data_ptr<T>();
  // x widened to float once (and, for q4, its sum over each block), then read from L1 by every tile.
  std::vector<float> xf(M * K), xsum(Q8Group ? 0 : M * blocks);
  const T* xp = x.data_ptr<T>();
  for (int i = 0; i < M; ++i) {
    const T* row = xp + i * x.stride(0);
    for (int64_t c = 0; c < K; ++c) xf[i * K + c] = static_cast<float>(row[c]);
    if constexpr (Q8Group == 0)
      for (int64_t b = 0; b < blocks; ++b) {
        float s = 0.f;
        for (int j = 0; j < 32; ++j) s += xf[i * K + b * 32 + j];
        xsum[i * blocks + b] = s;
      }
  }
  at::parallel_for(0, tiles, grain(kRowsPerTile * K * M / 2), [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kRowsPerTile, rows = std::min(kRowsPerTile, N - n0);
      v16 partial[M][kRowsPerTile];
      float msum[M][kRowsPerTile] = {};
      for (int64_t j = 0; j < kRowsPerTile; ++j) {
        v16 acc[M];
        float m[M] = {};
        if (j < rows) {
          const uint8_t* row = wp + (n0 + j) * row_bytes;
          if constexpr (Q8Group == 0) q4_row<M>(row, blocks, xf.data(), xsum.data(), K, acc, m);
          else q8_row<Q8Group, M>(row, blocks, xf.data(), K, acc);
        }
        for (int i = 0; i < M; ++i) {
          partial[i][j] = j < rows ? acc[i] : v16{};
          msum[i][j] = m[i];
        }
      }
      for (int i = 0; i < M; ++i) {
        float yt[kRowsPerTile];
        vec::store(yt, vec::transpose_sum(partial[i]));
        for (int64_t j = 0; j < rows; ++j) {  // bias and residual in float, one rounding to T
          float v = yt[j] + msum[i][j];
          if (bp) v += static_cast<float>(bp[n0 + j]);
          if (rp) v += static_cast<float>(rp[i * r_row + n0 + j]);
          op[i * N + n0 + j] = static_cast<T>(v);
        }
      }
    }
  });
}

template <typename T, int Q8Group>
void quant_gemv_rows(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                     const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  switch (x.size(0)) {
    case 1: return quant_gemv_impl<T, 1, Q8Group>(x, w, bias, residual, out);
    case 2: return quant_gemv_impl<T, 2, Q8Group>(x, w, bias, residual, out);
    case 3: return quant_gemv_impl<T, 3, Q8Group>(x, w, bias, residual, out);
    case 4: return quant_gemv_impl<T, 4, Q8Group>(x, w, bias, residual, out);
    default: TORCH_CHECK(false, "gemv: at most ", kGemvMaxRows, " rows, got ", x.size(0));
  }
}

template <typename T>
void quant_gemv_typed(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                      const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  if (w.scalar_type() == at::kByte) return quant_gemv_rows<T, 0>(x, w, bias, residual, out);
  if (w.size(2) == 34) return quant_gemv_rows<T, 32>(x, w, bias, residual, out);
  return quant_gemv_rows<T, 16>(x, w, bias, residual, out);
}

}  // namespace

torch::Tensor quant_gemv(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                         const std::optional<torch::Tensor>& residual) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "gemv: quantized w contiguous on the CPU");
  const bool q4 = w.scalar_type() == at::kByte && w.size(2) == 20;
  const bool q8 = w.scalar_type() == at::kChar && (w.size(2) == 34 || w.size(2) == 18);
  TORCH_CHECK(q4 || q8, "gemv: quantized w is uint8 [N, K/32, 20] or int8 [N, K/G, 2+G] for G 16 or 32");
  const int64_t group = q4 ? 32 : w.size(2) - 2;
  TORCH_CHECK(w.size(1) * group == x.size(1), "gemv: quantized w holds K = ", w.size(1) * group, ", x has ", x.size(1));
  auto out = tokenwire_kernels::new_output({x.size(0), w.size(0)}, x.scalar_type());
  if (x.size(0) == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat: quant_gemv_typed<float>(x, w, bias, residual, out); break;
    case at::kBFloat16: quant_gemv_typed<c10::BFloat16>(x, w, bias, residual, out); break;
    case at::kHalf: quant_gemv_typed<c10::Half>(x, w, bias, residual, out); break;
    default: TORCH_CHECK(false, "gemv: float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

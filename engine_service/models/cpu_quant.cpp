// The few-row GEMV over quantized weight blocks (quantized.py makes them; `gemv` sends 3-D weights here).
//
// q4: uint8 [N, K/32, 20]. Per 32 weights: fp16 d, fp16 m, 16 bytes of nibbles (byte j holds weight j in
//     its low nibble, weight j+16 in its high one); w = d*q + m. GGML's block_q4_1, which Q4_0 and Q4_K
//     are rewritten into at load.
// q4 tiles: uint8 [N/16, K/32, 320], q4 blocks of 16 rows interleaved (quantized.tile_q4): per block of
//     32, the 16 rows' fp16 d, their fp16 m, then 256 bytes of nibbles in dot-product order: byte
//     64*g + 4*r + t holds row r's weight 4g+t (low nibble) and 4g+16+t (high), g 0..3, t 0..3. With
//     AVX512-VNNI one dpbusd then meets 4 weights of 16 rows at once, and the scales of 16 rows convert
//     in one instruction: a fifth of the instructions a block costs row by row.
// q8 tiles: uint8 [N/16, K/32, 544], Q8_0 blocks of 16 rows interleaved (quantized.tile_q8): the 16 rows'
//     fp16 d, then 512 bytes q + 128 (dpbusd multiplies unsigned bytes by signed ones; the 128 * sum(qx)
//     is taken back per block), byte 64*g + 4*r + t = row r's weight 4g+t, g 0..7.
// q8: int8 [N, K/G, 2+G], G 16 or 32. Per G weights: fp16 d, then G int8 q; w = d*q. GGML's block_q8_0 at
//     G = 32 (Q8_0, --quantization int8), Q6_K's 16-weight sub-blocks at G = 16.
//
// A step of one stream is a pass over the weights, so its speed is the bytes read: 0.625 bytes a weight in
// q4 against 2 in bf16. The activation rows are quantized too, per row and block of 32, as llama.cpp does
// (its q8_1): x_b ~ dx_b * qx_b, qx int8 = round-half-even(x * 127 / max|x_b|), dx_b = max|x_b| / 127. Then
// y = sum_b d_b * dx_b * (q_b . qx_b) + m_b * dx_b * sum(qx_b), summed in float, rounded once to x's dtype.
// With AVX2 a block is one byte dot product (VNNI's dpbusd, or maddubs + madd) and one float multiply-add;
// widening every weight to float instead made the loop compute-bound at a third of memory speed. Without
// AVX2 the same quantized activations are met in float. `quantized.quantize_activations` is the reference.
//
// Against 8-bit weights (q8, q8 tiles) the activations get a second level: the residual x - dx*qx, quantized
// the same way (dx2 <= dx / 254), so x ~ dx*qx + dx2*qx2 to about 15 bits, and y adds d * dx2 * (q . qx2).
// One level cost `--quantization int8` on the default model 0.46 nats against the bf16 model's best token
// (0.09 with float activations; the accuracy rule allows 0.25): with 8-bit weights the activations' 8 bits
// were the larger error. A second dot product on the weights already in registers; 4-bit weights keep one.
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

// The activation rows, quantized (see the top of the file).
struct QuantizedRows {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K/32]: dx
  std::vector<float> sum;  // [M, K/32]: dx * sum(qx), for q4's m term
  std::vector<int32_t> qsum;  // [M, K/32]: sum(qx), for the q8 tiles' offset of 128
  // The second level (8-bit weights only): the residual x - dx * qx quantized the same way.
  std::vector<int8_t> q2;
  std::vector<float> d2;
  std::vector<int32_t> qsum2;
};

// One block of 32 values into int8: q, its scale (max|x| / 127) and sum(q).
inline float quantize_block(const float* x, int8_t* q, int32_t& total) {
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float scale = amax > 0.f ? 127.f / amax : 0.f;
  total = 0;
  for (int j = 0; j < 32; ++j) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(x[j] * scale));
    q[j] = static_cast<int8_t>(v);
    total += v;
  }
  return amax / 127.f;
}

// `residual`: also the second level, for weights of 8 bits (see the top of the file).
inline void quantize_rows(const float* xf, int M, int64_t K, QuantizedRows& out, bool residual) {
  const int64_t blocks = K / 32;
  out.q.resize(M * K);
  out.d.resize(M * blocks);
  out.sum.resize(M * blocks);
  out.qsum.resize(M * blocks);
  if (residual) out.q2.resize(M * K), out.d2.resize(M * blocks), out.qsum2.resize(M * blocks);
  for (int64_t r = 0; r < M * blocks; ++r) {
    const float* x = xf + r * 32;
    out.d[r] = quantize_block(x, out.q.data() + r * 32, out.qsum[r]);
    out.sum[r] = out.d[r] * static_cast<float>(out.qsum[r]);
    if (!residual) continue;
    float rest[32];
    for (int j = 0; j < 32; ++j) rest[j] = x[j] - static_cast<float>(out.q[r * 32 + j]) * out.d[r];
    out.d2[r] = quantize_block(rest, out.q2.data() + r * 32, out.qsum2[r]);
  }
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

#if defined(__AVX2__)
// Sums of 4 adjacent u8 x s8 products into 8 int32 lanes.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else  // pairs of products stay within int16: 2 * 255 * 127 < 32768 only for u <= 128, as here (15, 127)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline v16 widen(__m256 lanes) {  // 8 lanes into a 16-lane vector, upper half zero, for transpose_sum
  v16 r = {};
  std::memcpy(&r, &lanes, sizeof(lanes));
  return r;
}

// One q4 block against M quantized rows, into one set of accumulators.
template <int M>
inline void q4_block_i8(const uint8_t* w, int64_t b, int64_t blocks, const int8_t* xq, const float* xd,
                        const float* xs, int64_t K, __m256* acc, float* ms) {
  __builtin_prefetch(w + kPrefetchBytes, 0, 3);
  const float d = half_at(w), m = half_at(w + 2);
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 4));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
  for (int i = 0; i < M; ++i) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + b * 32));
    const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(q, xv));
    acc[i] = _mm256_fmadd_ps(dot, _mm256_set1_ps(d * xd[i * blocks + b]), acc[i]);
    ms[i] += m * xs[i * blocks + b];
  }
}

// Two blocks a step, into two sets of accumulators indexed by constants (so they stay in registers): one
// chain of multiply-adds waits out the FMA's latency at every block.
template <int M>
inline void q4_row_i8(const uint8_t* __restrict w, int64_t blocks, const QuantizedRows& x, int64_t K, v16* out,
                      float* msum) {
  const int8_t* xq = x.q.data();
  const float *xd = x.d.data(), *xs = x.sum.data();
  __m256 a0[M], a1[M];
  float m0[M], m1[M];
  for (int i = 0; i < M; ++i) a0[i] = a1[i] = _mm256_setzero_ps(), m0[i] = m1[i] = 0.f;
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    q4_block_i8<M>(w + b * 20, b, blocks, xq, xd, xs, K, a0, m0);
    q4_block_i8<M>(w + (b + 1) * 20, b + 1, blocks, xq, xd, xs, K, a1, m1);
  }
  if (b < blocks) q4_block_i8<M>(w + b * 20, b, blocks, xq, xd, xs, K, a0, m0);
  for (int i = 0; i < M; ++i) out[i] = widen(_mm256_add_ps(a0[i], a1[i])), msum[i] = m0[i] + m1[i];
}

// 32 q8 weights (one block of 32, or two of 16 with their own scales: lanes 0-3 and 4-7) against M rows.
// The weights are signed: |w| is the unsigned operand, x carries w's sign.
template <int G, int M>
inline void q8_step_i8(const uint8_t* w, int64_t b, const int8_t* xq, const float* xd, const int8_t* xq2,
                       const float* xd2, int64_t K, __m256* acc) {
  __builtin_prefetch(w + kPrefetchBytes, 0, 3);
  __m256i q;
  __m256 scale;
  if constexpr (G == 32) {
    q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
    scale = _mm256_set1_ps(half_at(w));
  } else {
    q = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 20)),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2)));
    scale = _mm256_set_m128(_mm_set1_ps(half_at(w + 18)), _mm_set1_ps(half_at(w)));
  }
  const __m256i magnitude = _mm256_abs_epi8(q);
  for (int i = 0; i < M; ++i) {
    const int64_t at = i * K + b * 32, r = i * (K / 32) + b;
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + at));
    const __m256i xv2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq2 + at));
    const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(magnitude, _mm256_sign_epi8(xv, q)));
    const __m256 dot2 = _mm256_cvtepi32_ps(dot_u8s8(magnitude, _mm256_sign_epi8(xv2, q)));
    const __m256 first = _mm256_mul_ps(dot, _mm256_set1_ps(xd[r]));
    acc[i] = _mm256_fmadd_ps(_mm256_fmadd_ps(dot2, _mm256_set1_ps(xd2[r]), first), scale, acc[i]);
  }
}

template <int G, int M>
inline void q8_row_i8(const uint8_t* __restrict w, int64_t blocks, const QuantizedRows& x, int64_t K, v16* out) {
  const int8_t *xq = x.q.data(), *xq2 = x.q2.data();
  const float *xd = x.d.data(), *xd2 = x.d2.data();
  constexpr int64_t kStepBytes = G == 32 ? 34 : 36;
  __m256 a0[M], a1[M];
  for (int i = 0; i < M; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
  const int64_t steps = K / 32;
  int64_t b = 0;
  for (; b + 2 <= steps; b += 2) {
    q8_step_i8<G, M>(w + b * kStepBytes, b, xq, xd, xq2, xd2, K, a0);
    q8_step_i8<G, M>(w + (b + 1) * kStepBytes, b + 1, xq, xd, xq2, xd2, K, a1);
  }
  if (b < steps) q8_step_i8<G, M>(w + b * kStepBytes, b, xq, xd, xq2, xd2, K, a0);
  for (int i = 0; i < M; ++i) out[i] = widen(_mm256_add_ps(a0[i], a1[i]));
}
#endif

// ---- q4 tiles of 16 rows ----

constexpr int64_t kTileBytes = 320;

// One tile of 16 rows against M quantized activation rows: y[i * 16 + r].
template <int M>
inline void q4_tile(const uint8_t* p, int64_t blocks, const QuantizedRows& x, int64_t K, float* y) {
  const int8_t* xq = x.q.data();
  const float *xd = x.d.data(), *xs = x.sum.data();
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  __m512 acc[M], macc[M];
  for (int i = 0; i < M; ++i) acc[i] = macc[i] = _mm512_setzero_ps();
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < blocks; ++b, p += kTileBytes) {
    for (int64_t line = 0; line < kTileBytes; line += 64) __builtin_prefetch(p + 8 * kTileBytes + line, 0, 3);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    __m512i lo[4], hi[4];
    for (int g = 0; g < 4; ++g) {
      const __m512i v = _mm512_loadu_si512(p + 64 + 64 * g);
      lo[g] = _mm512_and_si512(v, mask);
      hi[g] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    }
    for (int i = 0; i < M; ++i) {
      int32_t xw[8];  // the block's 32 activations as 8 groups of 4 bytes, each met by all 16 rows
      std::memcpy(xw, xq + i * K + b * 32, sizeof(xw));
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], _mm512_set1_epi32(xw[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[1], _mm512_set1_epi32(xw[1]));
      s0 = _mm512_dpbusd_epi32(s0, lo[2], _mm512_set1_epi32(xw[2]));
      s1 = _mm512_dpbusd_epi32(s1, lo[3], _mm512_set1_epi32(xw[3]));
      s0 = _mm512_dpbusd_epi32(s0, hi[0], _mm512_set1_epi32(xw[4]));
      s1 = _mm512_dpbusd_epi32(s1, hi[1], _mm512_set1_epi32(xw[5]));
      s0 = _mm512_dpbusd_epi32(s0, hi[2], _mm512_set1_epi32(xw[6]));
      s1 = _mm512_dpbusd_epi32(s1, hi[3], _mm512_set1_epi32(xw[7]));
      const int64_t r = i * blocks + b;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
      acc[i] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(xd[r])), acc[i]);
      macc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[r]), macc[i]);
    }
  }
  for (int i = 0; i < M; ++i) _mm512_storeu_ps(y + 16 * i, _mm512_add_ps(acc[i], macc[i]));
#else  // portable: the same sums, one row at a time
  for (int i = 0; i < M * 16; ++i) y[i] = 0.f;
  for (int64_t b = 0; b < blocks; ++b, p += kTileBytes)
    for (int r = 0; r < 16; ++r) {
      const float d = half_at(p + 2 * r), m = half_at(p + 32 + 2 * r);
      for (int i = 0; i < M; ++i) {
        const int8_t* x8 = xq + i * K + b * 32;
        int32_t dot = 0;
        for (int g = 0; g < 4; ++g)
          for (int t = 0; t < 4; ++t) {
            const uint8_t byte = p[64 + 64 * g + 4 * r + t];
            dot += (byte & 0x0F) * x8[4 * g + t] + (byte >> 4) * x8[16 + 4 * g + t];
          }
        y[i * 16 + r] += d * xd[i * blocks + b] * static_cast<float>(dot) + m * xs[i * blocks + b];
      }
    }
#endif
}

constexpr int64_t kQ8TileBytes = 544;

template <int M>
inline void q8_tile(const uint8_t* p, int64_t blocks, const QuantizedRows& x, int64_t K, float* y) {
  const int8_t *xq = x.q.data(), *xq2 = x.q2.data();
  const float *xd = x.d.data(), *xd2 = x.d2.data();
  const int32_t *qsum = x.qsum.data(), *qsum2 = x.qsum2.data();
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
  __m512 acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, p += kQ8TileBytes) {
    for (int64_t line = 0; line < kQ8TileBytes; line += 64) __builtin_prefetch(p + 8 * kQ8TileBytes + line, 0, 3);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    __m512i wq[8];
    for (int g = 0; g < 8; ++g) wq[g] = _mm512_loadu_si512(p + 32 + 64 * g);
    for (int i = 0; i < M; ++i) {
      int32_t xw[8], xw2[8];  // both levels of the block's activations, as 8 groups of 4 bytes
      std::memcpy(xw, xq + i * K + b * 32, sizeof(xw));
      std::memcpy(xw2, xq2 + i * K + b * 32, sizeof(xw2));
      __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[0], _mm512_set1_epi32(xw[0]));
      __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[1], _mm512_set1_epi32(xw[1]));
      __m512i t0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[0], _mm512_set1_epi32(xw2[0]));
      __m512i t1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[1], _mm512_set1_epi32(xw2[1]));
      for (int g = 2; g < 8; g += 2) {
        s0 = _mm512_dpbusd_epi32(s0, wq[g], _mm512_set1_epi32(xw[g]));
        s1 = _mm512_dpbusd_epi32(s1, wq[g + 1], _mm512_set1_epi32(xw[g + 1]));
        t0 = _mm512_dpbusd_epi32(t0, wq[g], _mm512_set1_epi32(xw2[g]));
        t1 = _mm512_dpbusd_epi32(t1, wq[g + 1], _mm512_set1_epi32(xw2[g + 1]));
      }
      const int64_t r = i * blocks + b;
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * qsum[r]));
      const __m512i dot2 = _mm512_sub_epi32(_mm512_add_epi32(t0, t1), _mm512_set1_epi32(128 * qsum2[r]));
      const __m512 both = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2), _mm512_set1_ps(xd2[r]),
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xd[r])));
      acc[i] = _mm512_fmadd_ps(both, d, acc[i]);
    }
  }
  for (int i = 0; i < M; ++i) _mm512_storeu_ps(y + 16 * i, acc[i]);
#else  // portable: the same sums, one row at a time
  for (int i = 0; i < M * 16; ++i) y[i] = 0.f;
  for (int64_t b = 0; b < blocks; ++b, p += kQ8TileBytes)
    for (int r = 0; r < 16; ++r) {
      const float d = half_at(p + 2 * r);
      for (int i = 0; i < M; ++i) {
        const int8_t *x8 = xq + i * K + b * 32, *r8 = xq2 + i * K + b * 32;
        int32_t dot = 0, dot2 = 0;
        for (int g = 0; g < 8; ++g)
          for (int t = 0; t < 4; ++t) {
            const int32_t wt = static_cast<int32_t>(p[32 + 64 * g + 4 * r + t]) - 128;
            dot += wt * x8[4 * g + t], dot2 += wt * r8[4 * g + t];
          }
        const int64_t at = i * blocks + b;
        y[i * 16 + r] += d * (xd[at] * static_cast<float>(dot) + xd2[at] * static_cast<float>(dot2));
      }
    }
#endif
}

template <typename T, int M, bool Q8>
void tiles_impl(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                   const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  const int64_t tiles = w.size(0), blocks = w.size(1), K = x.size(1), N = tiles * 16;
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  const T* bp = bias ? bias->data_ptr<T>() : nullptr;
  const T* rp = residual ? residual->data_ptr<T>() : nullptr;
  const int64_t r_row = residual ? residual->stride(0) : 0;
  T* op = out.data_ptr<T>();
  std::vector<float> xf(M * K);
  const T* xp = x.data_ptr<T>();
  for (int i = 0; i < M; ++i)
    for (int64_t c = 0; c < K; ++c) xf[i * K + c] = static_cast<float>(xp[i * x.stride(0) + c]);
  QuantizedRows xq;
  quantize_rows(xf.data(), M, K, xq, /*residual=*/Q8);
  at::parallel_for(0, tiles, grain(16 * K * M / 2), [&](int64_t begin, int64_t end) {
    float y[M * 16];
    for (int64_t tile = begin; tile < end; ++tile) {
      if constexpr (Q8) q8_tile<M>(wp + tile * blocks * kQ8TileBytes, blocks, xq, K, y);
      else q4_tile<M>(wp + tile * blocks * kTileBytes, blocks, xq, K, y);
      for (int i = 0; i < M; ++i)
        for (int64_t j = 0; j < 16; ++j) {  // bias and residual in float, one rounding to T
          const int64_t n = tile * 16 + j;
          float v = y[i * 16 + j];
          if (bp) v += static_cast<float>(bp[n]);
          if (rp) v += static_cast<float>(rp[i * r_row + n]);
          op[i * N + n] = static_cast<T>(v);
        }
    }
  });
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
  // x widened to float and quantized once, then read from L1 by every tile.
  std::vector<float> xf(M * K);
  const T* xp = x.data_ptr<T>();
  for (int i = 0; i < M; ++i) {
    const T* row = xp + i * x.stride(0);
    for (int64_t c = 0; c < K; ++c) xf[i * K + c] = static_cast<float>(row[c]);
  }
  QuantizedRows xq;
  quantize_rows(xf.data(), M, K, xq, /*residual=*/Q8Group != 0);
#if !defined(__AVX2__)  // the float loop meets the quantized values, dx * qx (+ dx2 * qx2)
  for (int64_t c = 0; c < M * K; ++c) {
    xf[c] = xq.d[c / 32] * static_cast<float>(xq.q[c]);
    if constexpr (Q8Group != 0) xf[c] += xq.d2[c / 32] * static_cast<float>(xq.q2[c]);
  }
  const std::vector<float>& xsum = xq.sum;
#endif
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
#if defined(__AVX2__)
          if constexpr (Q8Group == 0) q4_row_i8<M>(row, blocks, xq, K, acc, m);
          else q8_row_i8<Q8Group, M>(row, blocks, xq, K, acc);
#else
          if constexpr (Q8Group == 0) q4_row<M>(row, blocks, xf.data(), xsum.data(), K, acc, m);
          else q8_row<Q8Group, M>(row, blocks, xf.data(), K, acc);
#endif
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

template <typename T, bool Q8>
void tiles_rows(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  switch (x.size(0)) {
    case 1: return tiles_impl<T, 1, Q8>(x, w, bias, residual, out);
    case 2: return tiles_impl<T, 2, Q8>(x, w, bias, residual, out);
    case 3: return tiles_impl<T, 3, Q8>(x, w, bias, residual, out);
    case 4: return tiles_impl<T, 4, Q8>(x, w, bias, residual, out);
    default: TORCH_CHECK(false, "gemv: at most ", kGemvMaxRows, " rows, got ", x.size(0));
  }
}

template <typename T>
void quant_gemv_typed(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                      const std::optional<torch::Tensor>& residual, torch::Tensor& out) {
  if (w.scalar_type() == at::kByte && w.size(2) == kTileBytes) return tiles_rows<T, false>(x, w, bias, residual, out);
  if (w.scalar_type() == at::kByte && w.size(2) == kQ8TileBytes) return tiles_rows<T, true>(x, w, bias, residual, out);
  if (w.scalar_type() == at::kByte) return quant_gemv_rows<T, 0>(x, w, bias, residual, out);
  if (w.size(2) == 34) return quant_gemv_rows<T, 32>(x, w, bias, residual, out);
  return quant_gemv_rows<T, 16>(x, w, bias, residual, out);
}

}  // namespace

int64_t quant_out_features(const torch::Tensor& w) {
  const bool tiles = w.scalar_type() == at::kByte && (w.size(2) == kTileBytes || w.size(2) == kQ8TileBytes);
  return tiles ? w.size(0) * 16 : w.size(0);
}

torch::Tensor quant_gemv(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias,
                         const std::optional<torch::Tensor>& residual) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "gemv: quantized w contiguous on the CPU");
  const bool tiles = w.scalar_type() == at::kByte && (w.size(2) == kTileBytes || w.size(2) == kQ8TileBytes);
  const bool q4 = w.scalar_type() == at::kByte && w.size(2) == 20;
  const bool q8 = w.scalar_type() == at::kChar && (w.size(2) == 34 || w.size(2) == 18);
  TORCH_CHECK(tiles || q4 || q8,
              "gemv: quantized w is uint8 [N, K/32, 20], tiles uint8 [N/16, K/32, 320 or 544], or int8 [N, K/G, 2+G] "
              "for G 16 or 32");
  const int64_t group = q4 || tiles ? 32 : w.size(2) - 2;
  TORCH_CHECK(w.size(1) * group == x.size(1), "gemv: quantized w holds K = ", w.size(1) * group, ", x has ", x.size(1));
  auto out = tokenwire_kernels::new_output({x.size(0), quant_out_features(w)}, x.scalar_type());
  if (x.size(0) == 0) return out;
  switch (x.scalar_type()) {
    case at::kFloat: quant_gemv_typed<float>(x, w, bias, residual, out); break;
    case at::kBFloat16: quant_gemv_typed<c10::BFloat16>(x, w, bias, residual, out); break;
    case at::kHalf: quant_gemv_typed<c10::Half>(x, w, bias, residual, out); break;
    default: TORCH_CHECK(false, "gemv: float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return out;
}

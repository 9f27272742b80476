// Decode attention over the paged KV cache, in place (see cpu_kernels.cpp for the build and the ops).
//
// paged_decode: one query per sequence attends over its KV blocks where they lie in the cache (no gather). For
// head_dim 64 and 128: 16 keys at a time in vector registers (scores of a tile summed by one shuffle tree), each
// K/V row loaded once for the query heads of its group, the next tile prefetched as a tile is read, and the
// batch's keys cut into equal shares, one per thread (a sequence crossing a share's end is merged by
// log-sum-exp). At P1's batch 32 on 2 Xeon cores it reads the fp32 cache at 16-20 GB/s, about what a plain read of the
// same blocks reaches (19-21; both move with the VM's phase), 2.1-2.6x the first version (1.26 -> 0.44-0.60 ms
// per layer). A bf16/fp16 cache under fp32 queries (--kv-cache-dtype) halves the bytes. A general loop, key by
// key, serves other head dims and machines without AVX-512, where the tiles spill out of AVX2's 16 registers
// (measured no faster than it in an AVX2 build); it runs under the same split of the keys across threads.
#include "cpu_kernels.h"

namespace {

using tokenwire_kernels::check_cpu;
using tokenwire_kernels::narrow_kv;
using tokenwire_kernels::new_output;
using tokenwire_kernels::f;
using tokenwire_kernels::fast_exp;
using tokenwire_kernels::grain;

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += q[i] * f(k[i]);
  return acc;
}

constexpr int64_t kTile = 16;  // keys per tile: one vector of scores

template <typename T>
inline void row_pointers(const T* base, const int64_t* table, int64_t block_size, int64_t slot_stride,
                         int64_t t0, int64_t n, const T** rows) {
  int64_t blk = t0 / block_size, off = t0 % block_size;
  for (int64_t j = 0; j < n; ++j) {
    rows[j] = base + (table[blk] * block_size + off) * slot_stride;
    if (++off == block_size) { off = 0; ++blk; }
  }
}

// The cache rows of keys [t0, min(t0 + 16, end)), and of the next tile (null past `end`), which the tile
// loops prefetch a head's lines at a time as they go: blocks are scattered, so the hardware's stream
// prefetchers lose the thread at every block boundary, and a burst of a whole tile's prefetches at its
// start stalls on the line fill buffers (P1, 30 layers on a noisy 2-core VM: 0.47-0.58 ms per layer
// spread out, 0.53-0.65 in one burst; streaming the same bytes takes 0.40-0.48).
template <typename T>
inline void tile_rows(const T* base, const int64_t* table, int64_t block_size, int64_t slot_stride, int64_t t0,
                      int64_t end, const T** rows, const T** next) {
  row_pointers(base, table, block_size, slot_stride, t0, std::min(kTile, end - t0), rows);
  const int64_t ahead = std::clamp<int64_t>(end - t0 - kTile, 0, kTile);
  row_pointers(base, table, block_size, slot_stride, t0 + kTile, ahead, next);
  std::fill(next + ahead, next + kTile, nullptr);
}

// Softmax numerators in place, p = exp(s - max), on 16 lanes; the max and the sum of p.
inline void softmax_numerators(float* sc, int64_t count, float* mx, float* sum) {
  using vec::v16;
  const float inf = std::numeric_limits<float>::infinity();
  v16 vm = vec::splat(-inf);
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) { const v16 x = vec::load(sc + j); vm = x > vm ? x : vm; }
  float m = -inf;
  for (int l = 0; l < 16; ++l) m = std::max(m, vm[l]);
  for (; j < count; ++j) m = std::max(m, sc[j]);
  v16 vs = {};
  for (j = 0; j + 16 <= count; j += 16) {
    const v16 e = fast_exp(vec::load(sc + j) - m);
    vec::store(sc + j, e);
    vs += e;
  }
  float total = 0.f;
  for (int l = 0; l < 16; ++l) total += vs[l];
  for (; j < count; ++j) { sc[j] = fast_exp(sc[j] - m); total += sc[j]; }
  *mx = m;
  *sum = total;
}

// One task: query heads of sequence s over keys [k0, k1). Unnormalized output acc [H, d], and per head
// the running max and sum of exp, for a later merge of a sequence's chunks. Each K/V row is loaded (and,
// from bf16, widened) once for up to G query heads of its group, whose accumulators stay in registers.
// (`d` is DV * 16 here; it is a parameter so that both loops share ChunkKernel's signature.)
template <typename T, int DV>
void decode_chunk(const float* qf, const T* kp, const T* vp, const int64_t* table, int64_t block_size,
                  int64_t kvh, int64_t group, int64_t d, int64_t k0, int64_t k1, float* scores, float* acc,
                  float* mx, float* sum) {
  using vec::v16;
  constexpr int G = DV <= 4 ? 4 : 2;  // G * DV accumulators: at most 16 of the 32 vector registers
  const int64_t H = kvh * group, slot_stride = kvh * d, count = k1 - k0;
  const T* rows[kTile];
  const T* next[kTile];
  // Pass 1: scores [H, count], a tile of 16 keys at a time.
  for (int64_t t0 = k0; t0 < k1; t0 += kTile) {
    const int64_t n = std::min(kTile, k1 - t0);
    tile_rows(kp, table, block_size, slot_stride, t0, k1, rows, next);
    if (t0 + kTile >= k1) {  // the last K tile: prefetch the first V tile instead
      row_pointers(vp, table, block_size, slot_stride, k0, std::min(kTile, k1 - k0), next);
      std::fill(next + std::min(kTile, k1 - k0), next + kTile, nullptr);
    }
    for (int64_t h = 0; h < kvh; ++h) {
      for (int64_t g0 = 0; g0 < group; g0 += G) {
        const int64_t gn = std::min<int64_t>(G, group - g0);
        v16 qv[G][DV], part[G][kTile];
        for (int gg = 0; gg < G; ++gg)
          if (gg < gn) for (int c = 0; c < DV; ++c) qv[gg][c] = vec::load(qf + (h * group + g0 + gg) * d + 16 * c);
        for (int64_t j = 0; j < kTile; ++j) {
          v16 kv[DV];
          if (g0 == 0 && next[j]) for (int c = 0; c < DV; ++c) __builtin_prefetch(next[j] + h * d + 16 * c, 0, 3);
          for (int c = 0; c < DV; ++c) kv[c] = j < n ? vec::load(rows[j] + h * d + 16 * c) : v16{};
          for (int gg = 0; gg < G; ++gg) {
            if (gg >= gn) break;
            v16 a = qv[gg][0] * kv[0];
            for (int c = 1; c < DV; ++c) a += qv[gg][c] * kv[c];
            part[gg][j] = a;
          }
        }
        for (int64_t gg = 0; gg < gn; ++gg) {
          const v16 s = vec::transpose_sum(part[gg]);
          float* out = scores + (h * group + g0 + gg) * count + (t0 - k0);
          if (n == kTile) vec::store(out, s);
          else for (int64_t j = 0; j < n; ++j) out[j] = s[j];
        }
      }
    }
  }
  for (int64_t hg = 0; hg < H; ++hg) softmax_numerators(scores + hg * count, count, mx + hg, sum + hg);
  // Pass 2: acc = p @ V.
  std::fill(acc, acc + H * d, 0.f);
  for (int64_t t0 = k0; t0 < k1; t0 += kTile) {
    const int64_t n = std::min(kTile, k1 - t0);
    tile_rows(vp, table, block_size, slot_stride, t0, k1, rows, next);
    for (int64_t h = 0; h < kvh; ++h) {
      for (int64_t g0 = 0; g0 < group; g0 += G) {
        const int64_t gn = std::min<int64_t>(G, group - g0);
        float* a = acc + (h * group + g0) * d;
        const float* p = scores + (h * group + g0) * count + (t0 - k0);
        v16 av[G][DV];
        for (int gg = 0; gg < G; ++gg)
          if (gg < gn) for (int c = 0; c < DV; ++c) av[gg][c] = vec::load(a + gg * d + 16 * c);
        for (int64_t j = 0; j < n; ++j) {
          v16 vv[DV];
          if (g0 == 0 && next[j]) for (int c = 0; c < DV; ++c) __builtin_prefetch(next[j] + h * d + 16 * c, 0, 3);
          for (int c = 0; c < DV; ++c) vv[c] = vec::load(rows[j] + h * d + 16 * c);
          for (int gg = 0; gg < G; ++gg) {
            if (gg >= gn) break;
            const v16 w = vec::splat(p[gg * count + j]);
            for (int c = 0; c < DV; ++c) av[gg][c] += w * vv[c];
          }
        }
        for (int gg = 0; gg < G; ++gg)
          if (gg < gn) for (int c = 0; c < DV; ++c) vec::store(a + gg * d + 16 * c, av[gg][c]);
      }
    }
  }
}

// The same task for any head dim, and for machines without AVX-512: key by key, block by block (no
// integer division per key), each K/V row read from memory once for the query heads of its group.
template <typename T>
void decode_chunk_general(const float* qf, const T* kp, const T* vp, const int64_t* table, int64_t block_size,
                          int64_t kvh, int64_t group, int64_t d, int64_t k0, int64_t k1, float* scores, float* acc,
                          float* mx, float* sum) {
  const int64_t H = kvh * group, slot_stride = kvh * d, count = k1 - k0;
  for (int64_t t = k0, blk = k0 / block_size, off = k0 % block_size; t < k1; ++t) {
    const T* row = kp + (table[blk] * block_size + off) * slot_stride;
    for (int64_t hg = 0; hg < H; ++hg) scores[hg * count + (t - k0)] = dot(qf + hg * d, row + hg / group * d, d);
    if (++off == block_size) { off = 0; ++blk; }
  }
  for (int64_t hg = 0; hg < H; ++hg) softmax_numerators(scores + hg * count, count, mx + hg, sum + hg);
  std::fill(acc, acc + H * d, 0.f);
  for (int64_t t = k0, blk = k0 / block_size, off = k0 % block_size; t < k1; ++t) {
    const T* row = vp + (table[blk] * block_size + off) * slot_stride;
    for (int64_t hg = 0; hg < H; ++hg) {
      const float p = scores[hg * count + (t - k0)];
      const T* v = row + hg / group * d;
      float* a = acc + hg * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) a[i] += p * f(v[i]);
    }
    if (++off == block_size) { off = 0; ++blk; }
  }
}

// A sequence's keys [k0, k1), computed by thread share `part`.
struct Span {
  int64_t seq, k0, k1, part;
};

// Cuts the batch's keys (sequence s: [lo_of(s), lens[s])) into `parts` shares of equal size, in order:
// whole sequences while they fit, the one crossing a share's end cut at a tile. A share holds at least
// `min_share` keys, so short contexts are not split for nothing (nor a small model's woken thread paid).
template <typename LoOf>
std::vector<Span> balanced_spans(int64_t n, const int64_t* lens, LoOf lo_of, int64_t total, int64_t parts,
                                 int64_t min_share) {
  const int64_t share = std::max(min_share, (total + parts - 1) / parts);
  std::vector<Span> spans;
  int64_t part = 0, room = share;
  for (int64_t s = 0; s < n; ++s) {
    int64_t k = lo_of(s);
    if (k == lens[s]) spans.push_back({s, k, k, part});
    while (k < lens[s]) {
      if (room < kTile && part + 1 < parts) { ++part; room += share; }  // room >= kTile after this
      int64_t take = lens[s] - k;
      if (take > room && part + 1 < parts) take = room / kTile * kTile;
      spans.push_back({s, k, k + take, part});
      k += take;
      room -= take;
    }
  }
  return spans;
}

// out = acc / sum per head (a head that saw no key: zeros).
template <typename T>
void write_normalized(const float* acc, const float* sum, int64_t H, int64_t d, T* out) {
  for (int64_t hg = 0; hg < H; ++hg) {
    const float inv = sum[hg] > 0.f ? 1.f / sum[hg] : 0.f;
    for (int64_t i = 0; i < d; ++i) out[hg * d + i] = static_cast<T>(acc[hg * d + i] * inv);
  }
}

// One sequence's output from `count` partial results over disjoint key ranges, by log-sum-exp.
template <typename T>
void merge_partials(const float* acc, const float* mx, const float* sum, int64_t count, int64_t H, int64_t d,
                    T* out) {
  std::vector<float> o(d);
  for (int64_t hg = 0; hg < H; ++hg) {
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < count; ++c) if (sum[c * H + hg] > 0.f) M = std::max(M, mx[c * H + hg]);
    std::fill(o.begin(), o.end(), 0.f);
    float L = 0.f;
    for (int64_t c = 0; c < count; ++c) {
      if (sum[c * H + hg] <= 0.f) continue;
      const float w = fast_exp(mx[c * H + hg] - M);
      L += w * sum[c * H + hg];
      for (int64_t i = 0; i < d; ++i) o[i] += w * acc[(c * H + hg) * d + i];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int64_t i = 0; i < d; ++i) out[hg * d + i] = static_cast<T>(o[i] * inv);
  }
}

// q [n, H, d] (rows may be strided), caches [blocks, block_size, kv_heads, d], tables [n, max_blocks],
// lens [n] (keys 0..len-1 are visible; with window > 0 only the last `window` of them). out [n, H * d].
// `chunk(qf, s, k0, k1, scores, acc, mx, sum)` computes sequence s over keys [k0, k1) as decode_chunk does.
template <typename T, typename Chunk>
void paged_decode_spans(const torch::Tensor& q, const torch::Tensor& lens, double scale, int64_t window,
                        torch::Tensor& out, const Chunk& chunk) {
  const int64_t n = q.size(0), H = q.size(1), d = q.size(2), q_row = q.stride(0), q_head = q.stride(1);
  const T* qp = q.data_ptr<T>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  auto lo_of = [&](int64_t s) { return window > 0 ? std::max<int64_t>(0, lp[s] - window) : int64_t{0}; };
  // Every thread gets an equal share of the batch's keys (the K/V bytes to read), whole sequences where
  // they fit and a part of the one at each boundary (cut at a tile), merged afterwards by log-sum-exp:
  // one task per sequence split the batch by count, and at P1's lengths one thread read 8% more keys
  // while the other waited. A small batch of long contexts is split across every thread the same way.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), 64));
  int64_t total = 0;
  for (int64_t s = 0; s < n; ++s) total += lp[s] - lo_of(s);
  // At least 64 keys a share, and GRAIN_SIZE elements of work (small models stay on one thread).
  const std::vector<Span> spans = balanced_spans(n, lp, lo_of, total, parts, std::max<int64_t>(64, grain(2 * H * d)));
  const int64_t busy = spans.empty() ? 0 : spans.back().part + 1;  // shares with work: threads to wake
  std::vector<int64_t> pieces(n, 0), slot(spans.size(), -1);  // a split sequence's spans keep partials
  for (const Span& sp : spans) ++pieces[sp.seq];
  int64_t partials = 0;
  for (size_t i = 0; i < spans.size(); ++i) if (pieces[spans[i].seq] > 1) slot[i] = partials++;
  std::vector<float> part_acc(partials * H * d), part_max(partials * H), part_sum(partials * H);
  std::vector<int64_t> part_first(parts + 1);  // thread share p computes spans [part_first[p], part_first[p + 1])
  for (int64_t p = 0; p <= parts; ++p)
    part_first[p] = std::lower_bound(spans.begin(), spans.end(), p, [](const Span& sp, int64_t v) { return sp.part < v; }) -
                    spans.begin();
  int64_t longest = 0;
  for (const Span& sp : spans) longest = std::max(longest, sp.k1 - sp.k0);
  at::parallel_for(0, busy, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * d), acc(H * d), mx(H), sm(H), scores(H * (longest + kTile));
    for (int64_t i = part_first[begin]; i < part_first[end]; ++i) {
      const Span& sp = spans[i];
      const int64_t s = sp.seq;
      for (int64_t hg = 0; hg < H; ++hg)
        for (int64_t j = 0; j < d; ++j)
          qf[hg * d + j] = static_cast<float>(qp[s * q_row + hg * q_head + j]) * static_cast<float>(scale);
      const bool partial = slot[i] >= 0;
      float* a = partial ? part_acc.data() + slot[i] * H * d : acc.data();
      float* m = partial ? part_max.data() + slot[i] * H : mx.data();
      float* l = partial ? part_sum.data() + slot[i] * H : sm.data();
      if (sp.k1 > sp.k0) {
        chunk(qf.data(), s, sp.k0, sp.k1, scores.data(), a, m, l);
      } else {
        std::fill(a, a + H * d, 0.f); std::fill(m, m + H, 0.f); std::fill(l, l + H, 0.f);
      }
      if (!partial) write_normalized(a, l, H, d, op + s * H * d);
    }
  });
  // Merge each split sequence's spans by log-sum-exp (at most one per thread boundary: serially).
  for (size_t i = 0; i < spans.size();) {
    if (slot[i] < 0) { ++i; continue; }
    const int64_t s = spans[i].seq, first = slot[i];
    size_t j = i;
    while (j < spans.size() && spans[j].seq == s) ++j;
    merge_partials(part_acc.data() + first * H * d, part_max.data() + first * H, part_sum.data() + first * H,
                   static_cast<int64_t>(j - i), H, d, op + s * H * d);
    i = j;
  }
}

// The chunk kernel for a head dim: the 16-lane tiles for 64 and 128 where AVX-512 is built (with AVX2's 16
// registers the tiles spill: no faster than the general loop), the general loop otherwise.
template <typename KV>
using ChunkKernel = void (*)(const float*, const KV*, const KV*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, float*, float*, float*, float*);

template <typename KV>
ChunkKernel<KV> chunk_kernel(int64_t d) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<KV, double>) {
    if (d == 64) return decode_chunk<KV, 4>;
    if (d == 128) return decode_chunk<KV, 8>;
  }
#endif
  return decode_chunk_general<KV>;
}

template <typename T, typename KV>
void paged_decode_with(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const torch::Tensor& tables, const torch::Tensor& lens, double scale, int64_t window,
                       torch::Tensor& out) {
  const int64_t d = q.size(2), block_size = k_cache.size(1), kvh = k_cache.size(2), group = q.size(1) / kvh;
  const int64_t max_blocks = tables.size(1);
  const KV* kp = k_cache.data_ptr<KV>();
  const KV* vp = v_cache.data_ptr<KV>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const ChunkKernel<KV> kernel = chunk_kernel<KV>(d);
  paged_decode_spans<T>(q, lens, scale, window, out, [&](const float* qf, int64_t s, int64_t k0, int64_t k1,
                                                         float* scores, float* acc, float* mx, float* sum) {
    kernel(qf, kp, vp, tp + s * max_blocks, block_size, kvh, group, d, k0, k1, scores, acc, mx, sum);
  });
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                           torch::Tensor lens, double scale, int64_t window) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q: [n, heads, head_dim] with contiguous head_dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches: contiguous 4-d");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() || (q.scalar_type() == at::kFloat && narrow_kv(k_cache)),
              "caches: q's dtype, or bfloat16/float16 under float32 q; got ", k_cache.scalar_type(), " for ",
              q.scalar_type());
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0 && q.size(2) == k_cache.size(3), "head shapes");
  tables = tables.to(torch::kLong).contiguous();
  lens = lens.to(torch::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && lens.numel() == q.size(0), "tables/lens");
  auto out = new_output({q.size(0), q.size(1) * q.size(2)}, q.scalar_type());
  const auto run = [&](auto q_type, auto kv_type) {
    paged_decode_with<decltype(q_type), decltype(kv_type)>(q, k_cache, v_cache, tables, lens, scale, window, out);
  };
  if (k_cache.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kFloat) {
    run(float{}, c10::BFloat16{});
  } else if (k_cache.scalar_type() == at::kHalf && q.scalar_type() == at::kFloat) {
    run(float{}, c10::Half{});
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
      run(scalar_t{}, scalar_t{});
    });
  }
  return out;
}

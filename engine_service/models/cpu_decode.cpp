// The decoder layers of a Llama-family model for a batch of decodes, in one call from Python.
//
// At decode sizes a layer is ten small ops, and Python's per-op cost (argument parsing, dispatch, views)
// was 8 ms of a 91 ms batch-32 step and 5 ms of a 38 ms batch-1 step on 2 Xeon cores. Here the same ops
// run back to back from C++: the GEMMs are the same prepacked oneDNN calls (through the dispatcher),
// the rest are this extension's kernels plus a fused SiLU*mul. Only for steps made of decodes alone;
// prefill chunks keep the Python forward (SDPA), whose per-op cost is small next to their GEMMs.
#include "cpu_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace {

using tokenwire_kernels::fast_exp;
using tokenwire_kernels::grain;

// Per layer in `weights`: input norm, qkv, qkv bias or None, o, post norm, gate_up, down. The linears'
// weights are oneDNN-packed, or plain for the GEMV (at most kGemvMaxRows decodes).
constexpr int64_t kWeightsPerLayer = 7;

// This extension's own ops are called through the dispatcher too, so that torch.profiler times each
// of them (bench.profile's breakdown) as it does when Python calls them; it costs about a microsecond.
template <typename Fn>
c10::TypedOperatorHandle<Fn> tokenwire_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

c10::OperatorHandle linear_op(const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", overload);
}

// x @ W^T + b through oneDNN's prepacked GEMM, or the GEMV for a plain weight, as device.Linear calls
// them from Python.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& b) {
  static const auto gemv_op = tokenwire_op<decltype(gemv)>("tokenwire::gemv");
  if (!w.is_mkldnn()) return gemv_op.call(x, w, b, std::nullopt);
  static const c10::OperatorHandle op = linear_op("");
  // The constant arguments made once: each call copies a reference, not a string or a list.
  static const c10::IValue attr{"none"}, scalars{c10::List<std::optional<c10::Scalar>>()}, algorithm{""};
  torch::jit::Stack stack{x, w, b, attr, scalars, algorithm};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A view of `base`'s memory from element `offset` on, made without a dispatcher call (select, narrow and view
// each make one, and under torch.profiler their events: 4 per layer). Valid while `base` lives, as every
// view here is: within one decode_layers call.
torch::Tensor view_at(const torch::Tensor& base, int64_t offset, c10::IntArrayRef sizes, c10::IntArrayRef strides) {
  return torch::from_blob(static_cast<char*>(base.data_ptr()) + offset * base.element_size(), sizes, strides,
                          base.options());
}

// residual + x @ W^T, the add inside the GEMM.
torch::Tensor packed_linear_add(const torch::Tensor& x, const torch::Tensor& residual, const torch::Tensor& w) {
  static const auto gemv_op = tokenwire_op<decltype(gemv)>("tokenwire::gemv");
  if (!w.is_mkldnn()) return gemv_op.call(x, w, std::nullopt, residual);
  static const c10::OperatorHandle op = linear_op("binary");
  static const c10::IValue add{"add"};
  torch::jit::Stack stack{x, residual, w, c10::IValue(), add};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// silu(gate) * up of a fused [T, 2I] gate_up output into [T, I], 16 lanes at a time; in bf16 the SiLU is
// rounded before the product, as torch's two ops (F.silu in place, then mul_) round it.
template <typename T>
inline vec::v16 silu_times(vec::v16 g, vec::v16 u) {
  vec::v16 act = g / (1.f + fast_exp(-g));
  if constexpr (std::is_same_v<T, c10::BFloat16>) act = vec::round_bf16(act);
  return act * u;
}

template <typename T>
void silu_mul_impl(const torch::Tensor& gate_up, torch::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2, row = gate_up.stride(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, rows, grain(inter * 4), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = gp + t * row;
      const T* u = g + inter;
      T* o = op + t * inter;
      int64_t i = 0;
      for (; i + 16 <= inter; i += 16) vec::store(o + i, silu_times<T>(vec::load(g + i), vec::load(u + i)));
      if (i < inter) {  // the tail through a padded copy
        T gt[16] = {}, ut[16] = {}, ot[16];
        std::copy(g + i, g + inter, gt);
        std::copy(u + i, u + inter, ut);
        vec::store(ot, silu_times<T>(vec::load(gt), vec::load(ut)));
        std::copy(ot, ot + (inter - i), o + i);
      }
    }
  });
}

}  // namespace

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0, "silu_mul: [T, 2I] rows");
#if defined(__AVX512F__)
  auto out = tokenwire_kernels::new_output({gate_up.size(0), gate_up.size(1) / 2}, gate_up.scalar_type());
  switch (gate_up.scalar_type()) {
    case at::kFloat: silu_mul_impl<float>(gate_up, out); break;
    case at::kBFloat16: silu_mul_impl<c10::BFloat16>(gate_up, out); break;
    case at::kHalf: silu_mul_impl<c10::Half>(gate_up, out); break;
    default: TORCH_CHECK(false, "silu_mul: float32, bfloat16 or float16, got ", gate_up.scalar_type());
  }
  return out;
#else  // GCC's AVX2 code for the 16-lane loop ran 1.3-2x slower than torch's two ops
  const int64_t inter = gate_up.size(1) / 2;
  return at::silu(gate_up.narrow(1, 0, inter)).mul_(gate_up.narrow(1, inter, inter));
#endif
}

// h [n, hidden]: one token of each of n decodes; caches [layers, blocks, block_size, kv_heads, d]; tables and
// lens as paged_decode takes them; windows[i] > 0 for a sliding-window layer. Returns h after every layer.
torch::Tensor decode_layers(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, torch::Tensor slots,
                            torch::Tensor k_caches, torch::Tensor v_caches, torch::Tensor tables, torch::Tensor lens,
                            c10::List<std::optional<torch::Tensor>> weights, std::vector<int64_t> windows,
                            int64_t num_heads, int64_t num_kv_heads, double eps, double scale, int64_t gemm_rows) {
  const int64_t layers = k_caches.size(0), n = h.size(0), d = k_caches.size(4);
  TORCH_CHECK(gemm_rows >= n, "decode_layers: gemm_rows < rows");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layers * kWeightsPerLayer, "decode_layers: weights");
  TORCH_CHECK(static_cast<int64_t>(windows.size()) == layers, "decode_layers: windows");
  TORCH_CHECK(k_caches.is_contiguous() && v_caches.is_contiguous() && k_caches.sizes() == v_caches.sizes() &&
              k_caches.scalar_type() == v_caches.scalar_type(), "decode_layers: caches");
  tables = tables.to(torch::kLong).contiguous();
  lens = lens.to(torch::kLong).contiguous();
  slots = slots.to(torch::kLong).contiguous();
  static const auto norm_op = tokenwire_op<decltype(rms_norm)>("tokenwire::rms_norm");
  static const auto rope_op = tokenwire_op<decltype(rope_and_cache)>("tokenwire::rope_and_cache");
  static const auto attention_op = tokenwire_op<decltype(paged_decode)>("tokenwire::paged_decode");
  static const auto silu_mul_op = tokenwire_op<decltype(silu_mul)>("tokenwire::silu_mul");
  auto w = [&](int64_t layer, int64_t i) -> torch::Tensor { return *weights.get(layer * kWeightsPerLayer + i); };
  // The GEMMs run at `gemm_rows` rows (device.gemm_rows: a bounded set of shapes), so h carries zero rows
  // past the n decodes; rope, the cache write and attention see the n real rows only.
  const auto pad = [&](const torch::Tensor& x) {
    return x.size(0) == gemm_rows ? x : torch::constant_pad_nd(x, {0, 0, 0, gemm_rows - x.size(0)});
  };
  h = pad(h);
  const c10::IntArrayRef cache_sizes = k_caches.sizes().slice(1), cache_strides = k_caches.strides().slice(1);
  for (int64_t i = 0; i < layers; ++i) {
    const torch::Tensor k_cache = view_at(k_caches, i * k_caches.stride(0), cache_sizes, cache_strides);
    const torch::Tensor v_cache = view_at(v_caches, i * v_caches.stride(0), cache_sizes, cache_strides);
    const std::optional<torch::Tensor> qkv_bias = weights.get(i * kWeightsPerLayer + 2);
    torch::Tensor qkv = packed_linear(norm_op.call(h, w(i, 0), eps), w(i, 1), qkv_bias);
    if (n < gemm_rows) qkv = qkv.narrow(0, 0, n);
    rope_op.call(qkv, cos, sin, slots, k_cache, v_cache, num_heads, num_kv_heads);
    const torch::Tensor q = view_at(qkv, 0, {n, num_heads, d}, {qkv.stride(0), d, 1});
    torch::Tensor attn = attention_op.call(q, k_cache, v_cache, tables, lens, scale, windows[i]);
    h = packed_linear_add(pad(attn), h, w(i, 3));
    torch::Tensor act = silu_mul_op.call(packed_linear(norm_op.call(h, w(i, 4), eps), w(i, 5), std::nullopt));
    h = packed_linear_add(act, h, w(i, 6));
  }
  return n < gemm_rows ? h.narrow(0, 0, n) : h;
}

TORCH_LIBRARY_FRAGMENT(tokenwire, m) {
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor slots, Tensor(a!) k_caches, Tensor(b!) v_caches, "
        "Tensor tables, Tensor lens, Tensor?[] weights, int[] windows, int num_heads, int num_kv_heads, "
        "float eps, float scale, int gemm_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenwire, CPU, m) {
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_layers", &decode_layers);
}

// The prepacked weights are oneDNN tensors, which make the dispatcher look for this backend's kernel.
TORCH_LIBRARY_IMPL(tokenwire, MkldnnCPU, m) {
  m.impl("decode_layers", &decode_layers);
}

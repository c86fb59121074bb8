// A whole decoder layer of a decode step (one new token per sequence) in one call, for
// layers whose four matmuls run our quantized kernels or float weights on one process:
// torch.ops.ringllm.decode_layer.
//
// Why: with the matmuls fast, what was left of a step was the Python between them (module
// calls, wrappers, a dozen op dispatches a layer). This runs the same kernels, in the same
// order, on the same tensors as LlamaDecoderLayer.forward does (so the results are equal
// bit for bit), with none of that in between.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "ops.h"

namespace {

using at::Tensor;

// x @ W.T for a weight given as [codes, scales, mins] (4-bit, float16 scales), [codes, scale]
// (8-bit, float32 scale), either followed by its AMX tile records, or [weight] (float:
// inference/layers/gemm.py's `dense`, whose W @ x.T is faster on CPU for 2..128 rows).
Tensor linear(const Tensor& x, at::TensorList w, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(w.size() >= 1 && w.size() <= 4, "a weight is [weight], [codes, scale(, tiles)] or [codes, scales, mins(, tiles)]");
  if (w.size() == 1) {
    if (x.size(0) < 2 || x.size(0) > 128) return at::linear(x, w[0], bias);
    Tensor y = at::mm(w[0], x.t()).t().contiguous();
    return bias.has_value() ? y.add_(*bias) : y;
  }
  const bool q4 = w[1].scalar_type() == at::kHalf;
  const size_t parts = q4 ? 3 : 2;
  const c10::optional<Tensor> tiles = w.size() > parts ? c10::optional<Tensor>(w[parts]) : c10::nullopt;
  Tensor y = q4 ? ringllm::q4_linear(x, w[0], w[1], w[2], tiles) : ringllm::q8_linear(x, w[0], w[1], tiles);
  return bias.has_value() ? y.add_(*bias) : y;
}

// (the MLP's output, the residual stream before it): LlamaDecoderLayer.forward's contract.
// `h` is the previous layer's MLP output (the sum with `residual` is written into it), or
// the embeddings for the first layer (no residual).
std::tuple<Tensor, Tensor> decode_layer(Tensor h, const c10::optional<Tensor>& residual, const Tensor& input_norm,
                                        const Tensor& post_norm, double eps, at::TensorList qkv_w,
                                        const c10::optional<Tensor>& qkv_bias, at::TensorList o_w,
                                        at::TensorList gate_up_w, at::TensorList down_w, const Tensor& cos_sin,
                                        Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping,
                                        const Tensor& block_tables, at::IntArrayRef ctx_lens, double scale,
                                        int64_t q_heads, int64_t kv_heads) {
  const int64_t tokens = h.size(0), d = k_cache.size(3);
  Tensor x = residual.has_value() ? ringllm::add_rms_norm_(h, *residual, input_norm, eps)
                                  : ringllm::rms_norm(h, input_norm, eps);
  Tensor qkv = linear(x, qkv_w, qkv_bias).view({tokens, q_heads + 2 * kv_heads, d});
  ringllm::rope_kv(qkv, cos_sin, k_cache, v_cache, slot_mapping, q_heads, kv_heads);
  Tensor attn = ringllm::decode_attention(qkv.narrow(1, 0, q_heads), k_cache, v_cache, block_tables, ctx_lens, scale);
  Tensor stream = linear(attn.flatten(1), o_w, c10::nullopt);
  x = ringllm::add_rms_norm_(stream, h, post_norm, eps);  // stream += h: the residual after attention
  Tensor out = linear(ringllm::silu_mul(linear(x, gate_up_w, c10::nullopt)), down_w, c10::nullopt);
  return {out, stream};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ringllm, m) {
  m.def(
      "decode_layer(Tensor(a!) h, Tensor? residual, Tensor input_norm, Tensor post_norm, float eps, Tensor[] qkv_w, "
      "Tensor? qkv_bias, Tensor[] o_w, Tensor[] gate_up_w, Tensor[] down_w, Tensor cos_sin, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor slot_mapping, Tensor block_tables, int[] ctx_lens, float scale, int q_heads, "
      "int kv_heads) -> (Tensor, Tensor)",
      decode_layer);
}

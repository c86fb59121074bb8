// The library's ops as C++ functions, for the kernels that compose them (decode_layer.cpp).
// Each is the function registered as torch.ops.ringllm.<name>, with its checks.
#pragma once

#include <ATen/ATen.h>

namespace ringllm {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor add_rms_norm_(at::Tensor x, const at::Tensor& residual, const at::Tensor& w, double eps);
void rope_kv(at::Tensor qkv, const at::Tensor& cos_sin, at::Tensor k_cache, at::Tensor v_cache,
             const at::Tensor& slot_mapping, int64_t q_heads, int64_t kv_heads);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, at::IntArrayRef ctx_lens, double scale);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                     const c10::optional<at::Tensor>& tiles);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& tiles);

}  // namespace ringllm

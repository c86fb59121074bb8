// Rounding activations to int8 per block of 32, shared by the quantized matmuls
// (quant_ops.cpp) and their AMX tile path (quant_amx.cpp): both must round the same way, so a
// batch and a single row get the same answer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ringllm {

constexpr int64_t kBlock = 32;  // activations (and q4 weights) share a scale per 32 columns

// One activation row: x ~ q * scale per block, scale = max|x| / 127 (the last block may be
// shorter). `sums` gets each block's float sum (the q4 min term).
template <typename T>
void quantize_blocks(const T* x, int64_t k, int8_t* q, float* scales, float* sums) {
  for (int64_t b = 0; b * kBlock < k; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(k, lo + kBlock);
    float amax = 0.f, sum = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const float v = static_cast<float>(x[i]);
      amax = std::max(amax, std::fabs(v));
      sum += v;
    }
    const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t i = lo; i < hi; ++i) q[i] = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[i]) * inv));
    scales[b] = scale;
    sums[b] = sum;
  }
}

}  // namespace ringllm

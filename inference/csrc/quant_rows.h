// Rounding activations to int8 per block of 32, shared by the quantized matmuls
// (quant_ops.cpp) and their AMX tile path (quant_amx.cpp): both must round the same way, so a
// batch and a single row get the same answer.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "load16.h"

namespace ringllm {

constexpr int64_t kBlock = 32;  // activations (and q4 weights) share a scale per 32 columns

// One activation row: x ~ q * scale per block, scale = max|x| / 127 (the last block may be
// shorter). `sums` gets each block's float sum (the q4 min term). Full blocks of float32 or
// bf16 go through AVX-512 (a step of 16 sequences rounds ~1.5 M activations): the same
// products and round-to-nearest-even as the scalar loop, only the sum's order differs.
template <typename T>
void quantize_blocks(const T* x, int64_t k, int8_t* q, float* scales, float* sums) {
  for (int64_t b = 0; b * kBlock < k; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(k, lo + kBlock);
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
      if (hi - lo == kBlock) {
        const __m512 v0 = load16(x + lo), v1 = load16(x + lo + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + lo), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv))));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + lo + 16),
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv))));
        scales[b] = amax / 127.f;
        sums[b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        continue;
      }
    }
#endif
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

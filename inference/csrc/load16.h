// 16 floats in one register from float32, bf16 or float16 values: the activations the
// quantized kernels round, and the KV cache rows decode attention reads.
#pragma once

#if defined(__AVX512F__)
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

namespace ringllm {

inline __attribute__((always_inline)) __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
inline __attribute__((always_inline)) __m512 load16(const c10::BFloat16* p) {  // float32's top half: exact
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __attribute__((always_inline)) __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

}  // namespace ringllm
#endif

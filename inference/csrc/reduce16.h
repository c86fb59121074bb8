// The lanes of 16 registers summed at once (one shuffle tree), for kernels that leave each of
// 16 dot products as a register of partial sums: the quantized matmuls and decode attention.
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace ringllm {

// Lane r of the result: the sum of v[r]'s 16 lanes.
inline __attribute__((always_inline)) __m512 reduce16(const float (*v)[16]) {
  __m512 s1[8], s2[4], s3[2];
  for (int i = 0; i < 8; ++i) {  // rows 2i, 2i+1: a half register each
    const __m512 a = _mm512_load_ps(v[2 * i]), b = _mm512_load_ps(v[2 * i + 1]);
    s1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int j = 0; j < 4; ++j)  // 128-bit lane L: row 4j + L
    s2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0xDD));
  for (int k = 0; k < 2; ++k)  // 128-bit lane L: rows 8k + L and 8k + 4 + L, two partials each
    s3[k] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * k], s2[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_ps(s2[2 * k], s2[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Element e of 128-bit lane L: row L + 4e.
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(s3[0], s3[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

}  // namespace ringllm
#endif

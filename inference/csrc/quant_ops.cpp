// Quantized matmuls for the decode step: y = x @ W.T with W held as 4-bit or 8-bit codes,
// built and loaded with cpu_ops.cpp (inference/kernels.py) as torch.ops.ringllm.q4_linear
// and torch.ops.ringllm.q8_linear; inference/layers/quant_native.py packs the weights. A
// weight that also carries AMX tile records hands batches of 4 rows and more to
// quant_amx.cpp.
//
// Why our own: at batch 1 a matmul reads each weight once, so it should run at the speed the
// weights stream from cache or memory. torch's int4/int8 pack kernels widen every weight to
// float first and ran at a fifth of that here (the default model's 30 layers: 6.7 ms of
// matmuls a token where their 66 MB of codes stream in 1.4 ms). These kernels do what
// llama.cpp does instead: round each block of 32 activations to int8 with a scale of its
// own, and multiply codes by codes in integers (AVX512-VNNI's vpdpbusd: 64 multiply-adds per
// instruction), leaving one float multiply-add per block.
//
// Formats (inference/layers/quant_native.py builds them):
// - q4: codes uint8 [N, K/2], block b of row n in bytes [16 b, 16 b + 16), byte j holding
//   code j (low nibble) and code j + 16 (high nibble), which is llama.cpp's Q4_1 block
//   layout; scales float16 [N, K/32], mins float16 [K/32, N] (summed over 16 rows at
//   once); w = code * scale + min.
// - q8: codes uint8 [N, K] holding the int8 weight + 128 (vpdpbusd multiplies unsigned by
//   signed bytes: the activations keep the sign); scale float32 [N]; w = (code - 128) * scale.
// Without VNNI, AVX2 runs the same formats with 8-lane registers (vpmaddubsw for the byte
// products), and anything older through portable loops (correct, not fast).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "ops.h"
#include "prefetch.h"
#include "quant_amx.h"
#include "quant_rows.h"
#include "reduce16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Forced: a lambda or helper left out of line keeps its vectors in memory.
#define ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define RINGLLM_VNNI 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RINGLLM_AVX2 1
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using ringllm::kBlock;
using ringllm::prefetch;
using ringllm::quantize_blocks;
#if defined(__AVX512F__)
using ringllm::reduce16;
#endif

constexpr int64_t kQ4Chunk = 128;  // q4: 4 blocks, whose codes are one 64-byte load
constexpr int64_t kQ8Chunk = 64;   // q8: 2 blocks, one 64-byte load
constexpr int64_t kRowTile = 4;    // activation rows multiplied per pass over a weight row

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// The activations of one call, quantized once and laid out the way the kernels read them.
struct QuantizedRows {
  int64_t rows, chunks;
  std::vector<int8_t> q;       // [rows, chunks, chunk bytes], zero past K
  std::vector<float> lanes;    // [rows, chunks, 16]: the block scale of each int32 lane
  std::vector<float> sums;     // [rows, blocks] (q4)
  std::vector<float> offsets;  // [rows] (q8): 128 * sum of q * scale, what the +128 adds
};

// q4 order within a chunk of 4 blocks: the first 64 bytes hold values 0..15 of each block,
// the next 64 values 16..31, matching the low and high nibbles of one load of codes.
template <typename T>
QuantizedRows quantize_for_q4(const T* x, int64_t m, int64_t k) {
  const int64_t blocks = k / kBlock, chunks = ceil_div(k, kQ4Chunk);
  QuantizedRows r{m, chunks, std::vector<int8_t>(m * chunks * kQ4Chunk, 0), std::vector<float>(m * chunks * 16, 0.f),
                  std::vector<float>(m * blocks), {}};
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(k);
    std::vector<float> scales(blocks);
    for (int64_t row = begin; row < end; ++row) {
      quantize_blocks(x + row * k, k, q.data(), scales.data(), r.sums.data() + row * blocks);
      int8_t* out = r.q.data() + row * chunks * kQ4Chunk;
      float* lanes = r.lanes.data() + row * chunks * 16;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c = b / 4, j = b % 4;
        for (int64_t i = 0; i < 16; ++i) {
          out[c * kQ4Chunk + j * 16 + i] = q[b * kBlock + i];
          out[c * kQ4Chunk + 64 + j * 16 + i] = q[b * kBlock + 16 + i];
        }
        for (int64_t l = 0; l < 4; ++l) lanes[c * 16 + j * 4 + l] = scales[b];
      }
    }
  });
  return r;
}

// q8 order: the values in place, each 64-byte chunk's lanes 0..7 from its first block.
template <typename T>
QuantizedRows quantize_for_q8(const T* x, int64_t m, int64_t k) {
  const int64_t blocks = ceil_div(k, kBlock), chunks = ceil_div(k, kQ8Chunk);
  QuantizedRows r{m, chunks, std::vector<int8_t>(m * chunks * kQ8Chunk, 0), std::vector<float>(m * chunks * 16, 0.f),
                  {}, std::vector<float>(m)};
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scales(blocks), sums(blocks);
    for (int64_t row = begin; row < end; ++row) {
      int8_t* q = r.q.data() + row * chunks * kQ8Chunk;
      quantize_blocks(x + row * k, k, q, scales.data(), sums.data());
      float* lanes = r.lanes.data() + row * chunks * 16;
      double offset = 0.0;
      for (int64_t b = 0; b < blocks; ++b) {
        int64_t qsum = 0;
        for (int64_t i = b * kBlock; i < std::min(k, (b + 1) * kBlock); ++i) qsum += q[i];
        offset += 128.0 * static_cast<double>(qsum) * scales[b];
        for (int64_t l = 0; l < 8; ++l) lanes[b * 8 + l] = scales[b];  // chunk b/2, lanes 8 (b%2) ..
      }
      r.offsets[row] = static_cast<float>(offset);
    }
  });
  return r;
}

// Portable loops over the same layouts, one weight row at a time: the whole kernel where
// VNNI is missing, and the last rows of a matrix whose height is not a multiple of 16.
template <int MT>
void q4_rows_portable(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const c10::Half* scales,
                      const c10::Half* mins, int64_t k, int64_t begin, int64_t end, float* y, int64_t n) {
  const int64_t blocks = k / kBlock;
  for (int64_t row = begin; row < end; ++row)
    for (int t = 0; t < MT; ++t) {
      const int64_t ar = a0 + t;
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c = b / 4, j = b % 4;
        const int8_t* xq = a.q.data() + (ar * a.chunks + c) * kQ4Chunk;
        const uint8_t* w = codes + row * (k / 2) + b * 16;
        int32_t dot = 0;
        for (int64_t i = 0; i < 16; ++i) dot += (w[i] & 0x0F) * xq[j * 16 + i] + (w[i] >> 4) * xq[64 + j * 16 + i];
        const float xs = a.lanes[(ar * a.chunks + c) * 16 + j * 4];
        acc += static_cast<float>(dot) * static_cast<float>(scales[row * blocks + b]) * xs +
               static_cast<float>(mins[b * n + row]) * a.sums[ar * blocks + b];
      }
      y[ar * n + row] = acc;
    }
}

template <int MT>
void q8_rows_portable(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const float* scale, int64_t k,
                      int64_t begin, int64_t end, float* y, int64_t n) {
  for (int64_t row = begin; row < end; ++row)
    for (int t = 0; t < MT; ++t) {
      const int64_t ar = a0 + t;
      const int8_t* xq = a.q.data() + ar * a.chunks * kQ8Chunk;
      float acc = 0.f;
      for (int64_t b = 0; b * kBlock < k; ++b) {
        int32_t dot = 0;
        for (int64_t i = b * kBlock; i < std::min(k, (b + 1) * kBlock); ++i) dot += codes[row * k + i] * xq[i];
        acc += static_cast<float>(dot) * a.lanes[(ar * a.chunks) * 16 + b * 8];
      }
      y[ar * n + row] = (acc - a.offsets[ar]) * scale[row];  // the offset takes back the +128
    }
}

#if defined(RINGLLM_VNNI)
// Weight rows go in groups of 16: each row's dot products end as 16 partial sums in one
// register, and one shuffle tree turns the group's 16 registers into its 16 results. Summing
// each row on its own cost more than its multiply-adds at the default model's widths.

// Weight rows are fetched this many rows ahead: at batch 1 a row is read once, and without
// the hint each matmul's first rows and every new page wait on memory.
constexpr int64_t kAhead = 32;

// The scales of up to 4 blocks, lane l holding block l / 4's (a dot's lanes, 4 per block).
ALWAYS_INLINE __m512 spread4(const c10::Half* p, __mmask8 blocks) {
  const __m128 four = _mm_cvtph_ps(_mm_maskz_loadu_epi16(blocks, p));
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(four));
}

template <int MT>
void q4_rows(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const c10::Half* scales,
             const c10::Half* mins, int64_t k, int64_t begin, int64_t end, float* y, int64_t n) {
  const int64_t blocks = k / kBlock, full = blocks / 4, tail = blocks % 4;
  const __mmask64 tail_bytes = (1ULL << (16 * tail)) - 1;
  const __mmask8 tail_blocks = static_cast<__mmask8>((1u << tail) - 1);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  alignas(64) float part[MT][16][16];
  const int8_t* xqs[MT];
  const float* lanes[MT];
  for (int t = 0; t < MT; ++t) {
    xqs[t] = a.q.data() + (a0 + t) * a.chunks * kQ4Chunk;
    lanes[t] = a.lanes.data() + (a0 + t) * a.chunks * 16;
  }
  int64_t g = begin;
  for (; g + 16 <= end; g += 16) {
    if (g + 16 + kAhead <= end) {  // the mins the group kAhead rows on will read
      for (int64_t b = 0; b < blocks; ++b) _mm_prefetch(reinterpret_cast<const char*>(mins + b * n + g + kAhead), _MM_HINT_T0);
    }
    for (int r = 0; r < 16; ++r) {
      const uint8_t* w = codes + (g + r) * (k / 2);
      const c10::Half* d = scales + (g + r) * blocks;
      if (g + r + kAhead < end) {
        prefetch(w + kAhead * (k / 2), k / 2);
        prefetch(reinterpret_cast<const uint8_t*>(d + kAhead * blocks), blocks * 2);
      }
      __m512 acc[MT];
      for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
      auto chunk = [&](int64_t c, __m512i v, __m512 ds) {
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int t = 0; t < MT; ++t) {
          const int8_t* xq = xqs[t] + c * kQ4Chunk;
          __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
          dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(xq + 64));
          const __m512 scale = _mm512_mul_ps(ds, _mm512_loadu_ps(lanes[t] + c * 16));
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[t]);
        }
      };
      for (int64_t c = 0; c < full; ++c) chunk(c, _mm512_loadu_si512(w + c * 64), spread4(d + c * 4, 0x0F));
      if (tail) chunk(full, _mm512_maskz_loadu_epi8(tail_bytes, w + full * 64), spread4(d + full * 4, tail_blocks));
      for (int t = 0; t < MT; ++t) _mm512_store_ps(part[t][r], acc[t]);
    }
    for (int t = 0; t < MT; ++t) {
      // The min term for the group's 16 rows at once: mins are stored [blocks, N].
      __m512 sum = reduce16(part[t]);
      const float* sums = a.sums.data() + (a0 + t) * blocks;
      for (int64_t b = 0; b < blocks; ++b)
        sum = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + b * n + g))),
                              _mm512_set1_ps(sums[b]), sum);
      _mm512_storeu_ps(y + (a0 + t) * n + g, sum);
    }
  }
  if (g < end) q4_rows_portable<MT>(a, a0, codes, scales, mins, k, g, end, y, n);
}

template <int MT>
void q8_rows(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const float* scale, int64_t k, int64_t begin,
             int64_t end, float* y, int64_t n) {
  const int64_t full = k / kQ8Chunk, left = k % kQ8Chunk;
  const __mmask64 tail_bytes = (1ULL << left) - 1;
  alignas(64) float part[MT][16][16];
  const int8_t* xqs[MT];
  const float* lanes[MT];
  for (int t = 0; t < MT; ++t) {
    xqs[t] = a.q.data() + (a0 + t) * a.chunks * kQ8Chunk;
    lanes[t] = a.lanes.data() + (a0 + t) * a.chunks * 16;
  }
  int64_t g = begin;
  for (; g + 16 <= end; g += 16) {
    for (int r = 0; r < 16; ++r) {
      const uint8_t* w = codes + (g + r) * k;
      if (g + r + kAhead < end) prefetch(w + kAhead * k, k);
      __m512 acc[MT];
      for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
      auto chunk = [&](int64_t c, __m512i v) {
        for (int t = 0; t < MT; ++t) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(xqs[t] + c * 64));
          acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(lanes[t] + c * 16), acc[t]);
        }
      };
      for (int64_t c = 0; c < full; ++c) chunk(c, _mm512_loadu_si512(w + c * 64));
      if (left) chunk(full, _mm512_maskz_loadu_epi8(tail_bytes, w + full * 64));
      for (int t = 0; t < MT; ++t) _mm512_store_ps(part[t][r], acc[t]);
    }
    const __m512 s = _mm512_loadu_ps(scale + g);
    for (int t = 0; t < MT; ++t) {  // the offset takes back the +128 of every code
      const __m512 sum = _mm512_sub_ps(reduce16(part[t]), _mm512_set1_ps(a.offsets[a0 + t]));
      _mm512_storeu_ps(y + (a0 + t) * n + g, _mm512_mul_ps(sum, s));
    }
  }
  if (g < end) q8_rows_portable<MT>(a, a0, codes, scale, k, g, end, y, n);
}
#elif defined(RINGLLM_AVX2)
// AVX2 (e.g. AMD Zen 3): the same layouts and groups of 16 rows, 8 lanes a register, bytes
// multiplied by vpmaddubsw (unsigned x signed into 16-bit pairs) then summed into 32 bits.

constexpr int64_t kAhead = 32;  // rows fetched ahead, as in the AVX-512 path

// Lane r of the result: the sum of v[r]'s 8 lanes.
ALWAYS_INLINE __m256 reduce8(const float (*v)[8]) {
  __m256 t[4], u[2];
  for (int i = 0; i < 4; ++i) t[i] = _mm256_hadd_ps(_mm256_load_ps(v[2 * i]), _mm256_load_ps(v[2 * i + 1]));
  u[0] = _mm256_hadd_ps(t[0], t[1]);
  u[1] = _mm256_hadd_ps(t[2], t[3]);
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20), _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

// Two blocks' 32 codes each (low nibbles, then high) times their int8 activations: 8 lanes,
// 4 a block. The 16-bit sums stay below 2 * 2 * 15 * 127.
ALWAYS_INLINE __m256 q4_dot2(__m256i v, const int8_t* xlo, const int8_t* xhi) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xlo))),
                                     _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xhi))));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// The scales of 2 blocks, lane l holding block l / 4's.
ALWAYS_INLINE __m256 spread2(const c10::Half* p) {
  uint32_t two;
  std::memcpy(&two, p, sizeof two);
  const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(two)));
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

template <int MT>
void q4_rows(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const c10::Half* scales,
             const c10::Half* mins, int64_t k, int64_t begin, int64_t end, float* y, int64_t n) {
  const int64_t blocks = k / kBlock;
  if (blocks % 2) {  // an odd block count (K = 32, 96, ...): no pairs to load
    q4_rows_portable<MT>(a, a0, codes, scales, mins, k, begin, end, y, n);
    return;
  }
  alignas(32) float part[MT][16][8];
  int64_t g = begin;
  for (; g + 16 <= end; g += 16) {
    for (int r = 0; r < 16; ++r) {
      const uint8_t* w = codes + (g + r) * (k / 2);
      const c10::Half* d = scales + (g + r) * blocks;
      if (g + r + kAhead < end) prefetch(w + kAhead * (k / 2), k / 2);
      __m256 acc[MT];
      for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; b += 2) {  // blocks b, b + 1: half of a 4-block chunk
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 16));
        const __m256 ds = spread2(d + b);
        const int64_t c = b / 4, half = (b % 4) / 2;
        for (int t = 0; t < MT; ++t) {
          const int64_t base = (a0 + t) * a.chunks + c;
          const int8_t* xq = a.q.data() + base * kQ4Chunk + half * 32;
          const __m256 scale = _mm256_mul_ps(ds, _mm256_loadu_ps(a.lanes.data() + base * 16 + half * 8));
          acc[t] = _mm256_fmadd_ps(q4_dot2(v, xq, xq + 64), scale, acc[t]);
        }
      }
      for (int t = 0; t < MT; ++t) _mm256_store_ps(part[t][r], acc[t]);
    }
    for (int t = 0; t < MT; ++t) {
      const float* sums = a.sums.data() + (a0 + t) * blocks;
      for (int h = 0; h < 2; ++h) {  // 8 rows at a time; mins are [blocks, N]
        __m256 sum = reduce8(part[t] + 8 * h);
        for (int64_t b = 0; b < blocks; ++b)
          sum = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + b * n + g + 8 * h))),
                                _mm256_set1_ps(sums[b]), sum);
        _mm256_storeu_ps(y + (a0 + t) * n + g + 8 * h, sum);
      }
    }
  }
  if (g < end) q4_rows_portable<MT>(a, a0, codes, scales, mins, k, g, end, y, n);
}

template <int MT>
void q8_rows(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const float* scale, int64_t k, int64_t begin,
             int64_t end, float* y, int64_t n) {
  if (k % kBlock) {  // a short last block: no whole registers to load
    q8_rows_portable<MT>(a, a0, codes, scale, k, begin, end, y, n);
    return;
  }
  const int64_t blocks = k / kBlock;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  alignas(32) float part[MT][16][8];
  int64_t g = begin;
  for (; g + 16 <= end; g += 16) {
    for (int r = 0; r < 16; ++r) {
      const uint8_t* w = codes + (g + r) * k;
      if (g + r + kAhead < end) prefetch(w + kAhead * k, k);
      __m256 acc[MT];
      for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        // The signed weight (code - 128, never -128) as |w| times x with w's sign: vpmaddubsw
        // needs one unsigned side, and |w| * |x| pairs stay below 2^15.
        const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kBlock)), flip);
        const __m256i aw = _mm256_sign_epi8(ws, ws);
        for (int t = 0; t < MT; ++t) {
          const int64_t base = (a0 + t) * a.chunks;
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + base * kQ8Chunk + b * kBlock));
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, ws)), _mm256_set1_epi16(1));
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(a.lanes.data() + base * 16 + b * 8), acc[t]);
        }
      }
      for (int t = 0; t < MT; ++t) _mm256_store_ps(part[t][r], acc[t]);
    }
    for (int t = 0; t < MT; ++t)
      for (int h = 0; h < 2; ++h)  // already signed: no offset to take back
        _mm256_storeu_ps(y + (a0 + t) * n + g + 8 * h,
                         _mm256_mul_ps(reduce8(part[t] + 8 * h), _mm256_loadu_ps(scale + g + 8 * h)));
  }
  if (g < end) q8_rows_portable<MT>(a, a0, codes, scale, k, g, end, y, n);
}
#else
template <int MT>
void q4_rows(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const c10::Half* scales,
             const c10::Half* mins, int64_t k, int64_t begin, int64_t end, float* y, int64_t n) {
  q4_rows_portable<MT>(a, a0, codes, scales, mins, k, begin, end, y, n);
}

template <int MT>
void q8_rows(const QuantizedRows& a, int64_t a0, const uint8_t* codes, const float* scale, int64_t k, int64_t begin,
             int64_t end, float* y, int64_t n) {
  q8_rows_portable<MT>(a, a0, codes, scale, k, begin, end, y, n);
}
#endif

// y [M, N] (float32) for all activation rows, groups of 16 weight rows split over the threads.
template <typename RowsFn>
void for_row_tiles(int64_t m, int64_t n, int64_t k, RowsFn rows) {
  // At least 16 KiB of codes per thread: less costs more to hand out than to run.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, 16 * k));
  at::parallel_for(0, ceil_div(n, 16), grain, [&](int64_t group_begin, int64_t group_end) {
    const int64_t begin = group_begin * 16, end = std::min(n, group_end * 16);
    int64_t a0 = 0;
    for (; a0 + kRowTile <= m; a0 += kRowTile) rows(std::integral_constant<int, kRowTile>{}, a0, begin, end);
    switch (m - a0) {
      case 1: rows(std::integral_constant<int, 1>{}, a0, begin, end); break;
      case 2: rows(std::integral_constant<int, 2>{}, a0, begin, end); break;
      case 3: rows(std::integral_constant<int, 3>{}, a0, begin, end); break;
      default: break;
    }
  });
}

Tensor check_input(const Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "expected activations [rows, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "activations must be float32 or bfloat16");
  return x.contiguous();
}

// The weight's AMX tile records (quant_amx.h), if it has them, checked against its shape.
bool has_tiles(const c10::optional<Tensor>& tiles, int64_t n, int64_t k, bool q4) {
  if (!tiles.has_value()) return false;
  const Tensor& t = *tiles;
  TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous() && t.dim() == 3 && n % 16 == 0 && k % kBlock == 0 &&
                  t.size(0) == n / 16 && t.size(1) == k / kBlock && t.size(2) == ringllm::amx::record_bytes(q4),
              "tiles: uint8 [N/16, K/32, ", ringllm::amx::record_bytes(q4), "]");
  return true;
}

// A call on the weight's AMX tile records (quant_amx.h), by its rows: int8 tiles, bf16 tiles
// from kDenseRows, and from kLongRows torch's bf16 matmul on the weight dequantized for it.
template <typename Int8Tiles, typename Bf16Tiles, typename WeightBf16>
Tensor on_amx(const Tensor& x, int64_t n, Int8Tiles int8_tiles, Bf16Tiles bf16_tiles, WeightBf16 weight_bf16) {
  const int64_t m = x.size(0);
  if (m >= ringllm::amx::kLongRows) return at::linear(x.to(at::kBFloat16), weight_bf16()).to(x.scalar_type());
  Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (m >= ringllm::amx::kDenseRows) {
    bf16_tiles(y.mutable_data_ptr<float>());
  } else {
    int8_tiles(y.mutable_data_ptr<float>());
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

Tensor q4_linear(const Tensor& x_, const Tensor& codes, const Tensor& scales, const Tensor& mins,
                 const c10::optional<Tensor>& tiles) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "q4 codes: uint8 [N, K/2]");
  const int64_t n = codes.size(0), k = codes.size(1) * 2, blocks = k / kBlock;
  TORCH_CHECK(k % kBlock == 0, "q4: K must be a multiple of ", kBlock);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == n && scales.size(1) == blocks,
              "q4 scales: float16 [N, K/32]");
  TORCH_CHECK(mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.dim() == 2 && mins.size(0) == blocks &&
                  mins.size(1) == n,
              "q4 mins: float16 [K/32, N]");
  const Tensor x = check_input(x_, k);
  const int64_t m = x.size(0);
  const uint8_t* w = codes.const_data_ptr<uint8_t>();
  const c10::Half* d = scales.const_data_ptr<c10::Half>();
  const c10::Half* mn = mins.const_data_ptr<c10::Half>();
  if (has_tiles(tiles, n, k, true) && ringllm::amx::usable(m, n, k)) {
    const uint8_t* t = tiles->const_data_ptr<uint8_t>();
    return on_amx(
        x, n, [&](float* y) { ringllm::amx::q4_linear(x, t, mn, n, y); },
        [&](float* y) { ringllm::amx::q4_dense(x, t, mn, n, y); },
        [&] { return ringllm::amx::q4_weight_bf16(w, d, mn, n, k); });
  }
  Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  float* out = y.mutable_data_ptr<float>();
  QuantizedRows a = AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "q4_quantize",
                                                    [&] { return quantize_for_q4(x.const_data_ptr<scalar_t>(), m, k); });
  for_row_tiles(m, n, k, [&](auto mt, int64_t a0, int64_t begin, int64_t end) {
    q4_rows<decltype(mt)::value>(a, a0, w, d, mn, k, begin, end, out, n);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

Tensor q8_linear(const Tensor& x_, const Tensor& codes, const Tensor& scale, const c10::optional<Tensor>& tiles) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(), "q8 codes: uint8 [N, K]");
  const int64_t n = codes.size(0), k = codes.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n, "q8 scale: float32 [N]");
  const Tensor x = check_input(x_, k);
  const int64_t m = x.size(0);
  const uint8_t* w = codes.const_data_ptr<uint8_t>();
  const float* s = scale.const_data_ptr<float>();
  if (has_tiles(tiles, n, k, false) && ringllm::amx::usable(m, n, k)) {
    const uint8_t* t = tiles->const_data_ptr<uint8_t>();
    return on_amx(
        x, n, [&](float* y) { ringllm::amx::q8_linear(x, t, s, n, y); },
        [&](float* y) { ringllm::amx::q8_dense(x, t, s, n, y); },
        [&] { return ringllm::amx::q8_weight_bf16(w, s, n, k); });
  }
  Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  float* out = y.mutable_data_ptr<float>();
  QuantizedRows a = AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "q8_quantize",
                                                    [&] { return quantize_for_q8(x.const_data_ptr<scalar_t>(), m, k); });
  for_row_tiles(m, n, k, [&](auto mt, int64_t a0, int64_t begin, int64_t end) {
    q8_rows<decltype(mt)::value>(a, a0, w, s, k, begin, end, out, n);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

namespace ringllm {  // ops.h
Tensor q4_linear(const Tensor& x, const Tensor& codes, const Tensor& scales, const Tensor& mins,
                 const c10::optional<Tensor>& tiles) {
  return ::q4_linear(x, codes, scales, mins, tiles);
}
Tensor q8_linear(const Tensor& x, const Tensor& codes, const Tensor& scale, const c10::optional<Tensor>& tiles) {
  return ::q8_linear(x, codes, scale, tiles);
}
}  // namespace ringllm

TORCH_LIBRARY_FRAGMENT(ringllm, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scales, Tensor mins, Tensor? tiles=None) -> Tensor", q4_linear);
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scale, Tensor? tiles=None) -> Tensor", q8_linear);
  // Whether weights should carry AMX tile records (quant_amx.h) for batches.
  m.def("amx_ready() -> bool", [] { return ringllm::amx::ready(); });
}

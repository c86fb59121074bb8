// Fused CPU kernels for the decode step; inference/kernels.py builds this file once, loads it
// as torch.ops.ringllm.*, and holds the torch reference each kernel must match.
//
// Why: one decode step of a small model on a CPU spends more time dispatching tiny torch ops
// (about 50 per layer, a few microseconds each) than multiplying. Each kernel here replaces a
// run of them with one loop over the data: RMSNorm with the residual add, RoPE with the KV
// cache write, attention over the paged cache without gathering it, and SiLU-and-multiply.
// The quantized matmuls are in quant_ops.cpp; float ones stay torch's.
//
// Every index a peer can influence (cache slots, block tables, context lengths) is checked
// before use: a stage receives them from the master over the network.
//
// Rounding follows the torch path: each step that torch rounds to the tensor's dtype is
// rounded here too (the `round_to` casts), and the build turns off FMA contraction, so for
// float32 RoPE and the residual add give the same bits; sums (norm, attention) differ in the
// order of addition only.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "load16.h"
#include "ops.h"
#include "prefetch.h"
#include "reduce16.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
using ringllm::prefetch;
#if defined(__AVX512F__)
using ringllm::reduce16;
#endif

// Forced: GCC otherwise calls fast_exp out of line, which keeps the loops around it scalar.
#define ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t kLanes = 16;  // independent accumulators: a vertical loop vectorizes without -ffast-math

template <typename T>
ALWAYS_INLINE float f32(T x) {
  return static_cast<float>(x);
}

template <typename T>
ALWAYS_INLINE float round_to(float x) {  // x stored as T and read back: torch's rounding after an op
  return static_cast<float>(static_cast<T>(x));
}

// e^x within 2 ulp (Cephes' range reduction and polynomial); branch-free so it vectorizes.
// Above 88.8 it is +inf, as expf: with a finite cap GCC evaluates the capped case's constant
// quotient for every lane (silu: g / 2e38), whose subnormal results cost ~100 cycles each.
ALWAYS_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.8f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// The lanes summed pairwise: vector adds, where a left-to-right sum would be 16 scalar ones.
ALWAYS_INLINE float lane_sum(float* acc) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

template <typename T>
float sum_squares(const T* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += f32(x[i + j]) * f32(x[i + j]);
  float s = 0.f;
  for (; i < n; ++i) s += f32(x[i]) * f32(x[i]);
  return s + lane_sum(acc);
}

template <typename T>
ALWAYS_INLINE float dot_generic(const float* q, const T* k, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += q[i + j] * f32(k[i + j]);
  float s = 0.f;
  for (; i < n; ++i) s += q[i] * f32(k[i]);
  return s + lane_sum(acc);
}

#if defined(__AVX512F__)
using ringllm::load16;  // 16 cache values as floats in one register
#endif


// q . k over n values: a decode step computes one per (query head, context row), so the
// horizontal sum at its end must stay in registers (the generic loop's spills to memory
// made it ~5x slower).
template <typename T>
ALWAYS_INLINE float dot(const float* q, const T* k, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    if (n % 16 == 0) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(q + i), load16(k + i)));
      return _mm512_reduce_add_ps(acc);
    }
  }
#endif
  return dot_generic(q, k, n);
}

// Rows of at least this many elements in total are split over threads; smaller work runs
// inline, since waking the thread pool costs more than a decode step's row.
// (The loops' lambdas capture by value: with captured references the compiler cannot rule
// out aliasing and leaves the loops scalar.)
constexpr int64_t kParallelElements = 1 << 15;

int64_t grain(int64_t per_item) {
  return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, per_item));
}

void check_rows(const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "expected a contiguous [rows, hidden] tensor");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.numel() == x.size(1), "weight does not match hidden size");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight and input dtypes differ");
}

// out = rms_norm(x) * w, row by row; with `res`, x += res first (in place: x becomes the
// residual stream). As torch's rms_norm: normalize and scale in float, then round once.
template <typename T>
void rms_rows(T* x, const T* res, const T* w, T* out, int64_t rows, int64_t h, double eps) {
  at::parallel_for(0, rows, grain(h), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * h;
      if (res != nullptr) {
        const T* rr = res + r * h;
        for (int64_t i = 0; i < h; ++i) xr[i] = static_cast<T>(f32(xr[i]) + f32(rr[i]));
      }
      const float inv = 1.f / std::sqrt(sum_squares(xr, h) / static_cast<float>(h) + static_cast<float>(eps));
      T* o = out + r * h;
      for (int64_t i = 0; i < h; ++i) o[i] = static_cast<T>(f32(xr[i]) * inv * f32(w[i]));
    }
  });
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  check_rows(x, w);
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(const_cast<scalar_t*>(x.const_data_ptr<scalar_t>()), nullptr, w.const_data_ptr<scalar_t>(),
                       out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), eps);
  });
  return out;
}

Tensor add_rms_norm_(Tensor x, const Tensor& residual, const Tensor& w, double eps) {
  check_rows(x, w);
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.is_contiguous() && residual.scalar_type() == x.scalar_type(),
              "residual does not match the input");
  Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm_", [&] {
    rms_rows<scalar_t>(x.mutable_data_ptr<scalar_t>(), residual.const_data_ptr<scalar_t>(),
                       w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), eps);
  });
  return out;
}

void check_cache(const Tensor& k_cache, const Tensor& v_cache, const Tensor& like, int64_t kv_heads, int64_t dim) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous(),
              "expected two contiguous [blocks, block_size, kv_heads, head_dim] caches");
  TORCH_CHECK(k_cache.size(2) == kv_heads && k_cache.size(3) == dim, "cache heads do not match");
  // The activations' dtype, or bfloat16 / float16 under float32 activations (half the bytes
  // a decode step reads: inference/model_runner.py's kv_cache_dtype).
  const auto c = k_cache.scalar_type(), a = like.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == c && (c == a || (a == at::kFloat && (c == at::kBFloat16 || c == at::kHalf))),
              "cache dtype ", c, " does not go with ", a, " activations");
}

// Runs fn(activation type, cache type) for the pairs check_cache allows.
template <typename Fn>
void dispatch_cache(at::ScalarType activations, at::ScalarType cache, Fn fn) {
  if (activations == at::kFloat && cache == at::kBFloat16) return fn(float{}, c10::BFloat16{});
  if (activations == at::kFloat && cache == at::kHalf) return fn(float{}, c10::Half{});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, activations, "cache", [&] { fn(scalar_t{}, scalar_t{}); });
}

// Rotates the query and key heads of qkv [T, q_heads + 2 kv_heads, D] in place
// (x * cos + roll(x, D/2) * sin, the sine sign-folded as in layers/rotary.py) and writes the
// rotated keys and the values to their cache rows.
template <typename T, typename C>
void rope_kv_impl(Tensor& qkv, const Tensor& cos_sin, Tensor& k_cache, Tensor& v_cache, const int64_t* slots,
                  int64_t q_heads, int64_t kv_heads) {
  const int64_t tokens = qkv.size(0), heads = qkv.size(1), d = qkv.size(2), half = d / 2;
  T* base = qkv.mutable_data_ptr<T>();
  const T* table = cos_sin.const_data_ptr<T>();
  C* kc = k_cache.mutable_data_ptr<C>();
  C* vc = v_cache.mutable_data_ptr<C>();
  at::parallel_for(0, tokens, grain(heads * d), [=](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t t = begin; t < end; ++t) {
      const T* cos = table + t * 2 * d;
      const T* sin = cos + d;
      T* row = base + t * heads * d;
      for (int64_t h = 0; h < q_heads + kv_heads; ++h) {
        T* head = row + h * d;
        for (int64_t i = 0; i < d; ++i) x[i] = f32(head[i]);
        for (int64_t i = 0; i < d; ++i) {  // x[i + half] for the first half, x[i - half] after
          const float partner = i < half ? x[i + half] : x[i - half];
          head[i] = static_cast<T>(round_to<T>(x[i] * f32(cos[i])) + round_to<T>(partner * f32(sin[i])));
        }
      }
      const int64_t slot = slots[t], n = kv_heads * d;
      if constexpr (std::is_same_v<T, C>) {
        std::memcpy(kc + slot * n, row + q_heads * d, n * sizeof(T));
        std::memcpy(vc + slot * n, row + (q_heads + kv_heads) * d, n * sizeof(T));
      } else {  // rounded to nearest even, as torch's .to() does
        for (int64_t i = 0; i < n; ++i) kc[slot * n + i] = static_cast<C>(f32(row[q_heads * d + i]));
        for (int64_t i = 0; i < n; ++i) vc[slot * n + i] = static_cast<C>(f32(row[(q_heads + kv_heads) * d + i]));
      }
    }
  });
}

void rope_kv(Tensor qkv, const Tensor& cos_sin, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping,
             int64_t q_heads, int64_t kv_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.size(1) == q_heads + 2 * kv_heads,
              "expected contiguous qkv [tokens, q_heads + 2 kv_heads, head_dim]");
  const int64_t tokens = qkv.size(0), d = qkv.size(2);
  TORCH_CHECK(d % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos_sin.dim() == 3 && cos_sin.is_contiguous() && cos_sin.size(0) == tokens && cos_sin.size(1) == 2 &&
                  cos_sin.size(2) == d && cos_sin.scalar_type() == qkv.scalar_type(),
              "expected a contiguous [tokens, 2, head_dim] rotary table in the activations' dtype");
  check_cache(k_cache, v_cache, qkv, kv_heads, d);
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.numel() == tokens && slot_mapping.scalar_type() == at::kLong &&
                  slot_mapping.is_contiguous(),
              "expected one int64 cache slot per token");
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const int64_t rows = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < rows, "cache slot ", slots[t], " out of range [0, ", rows, ")");
  dispatch_cache(qkv.scalar_type(), k_cache.scalar_type(), [&](auto t, auto c) {
    rope_kv_impl<decltype(t), decltype(c)>(qkv, cos_sin, k_cache, v_cache, slots, q_heads, kv_heads);
  });
}

// Cached rows sit in blocks scattered over the pool, so the hardware prefetcher stops at each
// block's end, and the cache of a whole model does not fit in any CPU cache: fetch each key
// and value row `kAhead` tokens ahead by hand (16 streams x 130 tokens, 30 layers of the
// default model's shape: 26-27 ms a step without, 15-21 with).
constexpr int64_t kAhead = 16;

// x = softmax(x) in place, as separate loops over 16 lanes: a running max or sum in one
// scalar is a chain the compiler may not reorder, which kept the whole loop (exp included)
// scalar.
ALWAYS_INLINE void softmax(float* x, int64_t n) {
  float top[kLanes], sum[kLanes];
  std::fill(top, top + kLanes, x[0]);
  std::fill(sum, sum + kLanes, 0.f);
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) top[j] = std::max(top[j], x[t + j]);
  float m = *std::max_element(top, top + kLanes);
  for (; t < n; ++t) m = std::max(m, x[t]);
  for (t = 0; t < n; ++t) x[t] = fast_exp(x[t] - m);
  for (t = 0; t + kLanes <= n; t += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) sum[j] += x[t + j];
  float total = 0.f;
  for (; t < n; ++t) total += x[t];
  const float norm = 1.f / (total + lane_sum(sum));
  for (t = 0; t < n; ++t) x[t] *= norm;
}

#if defined(__AVX512F__)
// fn(std::integral_constant<int, n>) for 1 <= n <= 16 / DV: a number of query heads as a
// compile-time constant, so that their sums (or queries) stay in registers.
template <int DV, typename Fn>
ALWAYS_INLINE void by_heads(int64_t n, Fn fn) {
  static_assert(DV == 4 || DV == 8, "16 / DV heads of DV registers each");
  if (n == 1) fn(std::integral_constant<int, 1>{});
  else if constexpr (DV == 8) fn(std::integral_constant<int, 2>{});
  else if (n == 2) fn(std::integral_constant<int, 2>{});
  else if (n == 3) fn(std::integral_constant<int, 3>{});
  else fn(std::integral_constant<int, 4>{});
}

// Query heads h0 .. h0 + H - 1 (held in registers) against KV head kh of rows 0 .. n - 1:
// each dot product left as 16 partial sums in part[h][j].
template <int DV, int H, typename T>
ALWAYS_INLINE void scores_of(const float* qf, const T* const* krows, int64_t n, int64_t h0, int64_t kh,
                             float (*part)[16][16]) {
  constexpr int64_t d = DV * 16;
  __m512 q[H][DV];
#pragma GCC unroll 16
  for (int g = 0; g < H; ++g)
    for (int i = 0; i < DV; ++i) q[g][i] = _mm512_loadu_ps(qf + (h0 + g) * d + i * 16);
  for (int64_t j = 0; j < n; ++j) {
    __m512 k[DV];
#pragma GCC unroll 16
    for (int i = 0; i < DV; ++i) k[i] = load16(krows[j] + kh * d + i * 16);
#pragma GCC unroll 16
    for (int g = 0; g < H; ++g) {
      __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
#pragma GCC unroll 16
      for (int i = 1; i < DV; ++i) acc = _mm512_fmadd_ps(q[g][i], k[i], acc);
      _mm512_store_ps(part[h0 + g][j], acc);
    }
  }
}

// The vector path of decode attention (head_dim a multiple of 16), one sequence's context rows
// given in order. Scores 16 rows at a time: each (head, row) dot product is left as 16 partial
// sums, and one shuffle tree adds up 16 rows' at once (a horizontal sum per dot product, plus
// a scalar softmax, cost more than the multiply-adds).
// DV: head_dim / 16 where it is 4 or 8, whose key rows are loaded (and widened) once for all
// the query heads that share them (up to 16 / DV at a time, their queries in registers); 0
// for any other multiple of 16.
template <int DV, typename T>
void scores_by_16(const float* qf, const T* const* krows, int64_t len, int64_t q_heads, int64_t group, int64_t d,
                  float* scores, float (*part)[16][16]) {
  const int64_t kv_heads = q_heads / group, row_bytes = d * kv_heads * sizeof(T);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - t0);
    for (int64_t j = 0; j < n; ++j)
      if (t0 + j + kAhead < len) prefetch(krows[t0 + j + kAhead], row_bytes);
    if constexpr (DV > 0) {
      constexpr int64_t kHeads = 16 / DV;
      for (int64_t kh = 0; kh < kv_heads; ++kh)
        for (int64_t h0 = kh * group; h0 < (kh + 1) * group; h0 += kHeads) {
          by_heads<DV>(std::min(kHeads, (kh + 1) * group - h0), [&](auto heads) {
            scores_of<DV, decltype(heads)::value>(qf, krows + t0, n, h0, kh, part);
          });
        }
    } else {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t h = 0; h < q_heads; ++h) {
          const float* qh = qf + h * d;
          const T* k = krows[t0 + j] + (h / group) * d;
          __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), load16(k));
          for (int64_t i = 16; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load16(k + i), acc);
          _mm512_store_ps(part[h][j], acc);
        }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t h = 0; h < q_heads; ++h) {
      for (int64_t j = n; j < 16; ++j) _mm512_store_ps(part[h][j], _mm512_setzero_ps());
      _mm512_mask_storeu_ps(scores + h * len + t0, live, reduce16(part[h]));
    }
  }
}

// Heads h0 .. h0 + H - 1 of out [q_heads, d] = the value rows weighted by their scores, all
// of them reading KV head `kv` (at offset kv * d of a row): each row's values are loaded (and
// widened) once for the H heads, whose H x DV sums stay in registers.
template <int DV, int H, typename T>
ALWAYS_INLINE void weighted_values_of(const float* scores, const T* const* vrows, int64_t len, int64_t h0, int64_t kv,
                                      int64_t ahead_bytes, float* out) {
  constexpr int64_t d = DV * 16;
  __m512 acc[H][DV];
#pragma GCC unroll 16
  for (int g = 0; g < H; ++g)
    for (int i = 0; i < DV; ++i) acc[g][i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    if (ahead_bytes > 0 && t + kAhead < len) prefetch(vrows[t + kAhead], ahead_bytes);
    __m512 v[DV];
#pragma GCC unroll 16
    for (int i = 0; i < DV; ++i) v[i] = load16(vrows[t] + kv * d + i * 16);
#pragma GCC unroll 16
    for (int g = 0; g < H; ++g) {
      const __m512 p = _mm512_set1_ps(scores[(h0 + g) * len + t]);
#pragma GCC unroll 16
      for (int i = 0; i < DV; ++i) acc[g][i] = _mm512_fmadd_ps(p, v[i], acc[g][i]);
    }
  }
  for (int g = 0; g < H; ++g)
    for (int i = 0; i < DV; ++i) _mm512_storeu_ps(out + (h0 + g) * d + i * 16, acc[g][i]);
}

// out [q_heads, d] = the value rows weighted by the scores, one KV head at a time and up to
// 16 / DV of its query heads a pass (3 heads a KV head, 64 wide: one pass that loads each row
// once; a pass of 4 heads across KV heads loaded it once a head, and 9 heads took 3 passes,
// the last with 1 head of 4).
template <int DV, typename T>
void weighted_values(const float* scores, const T* const* vrows, int64_t len, int64_t q_heads, int64_t group,
                     float* out) {
  constexpr int64_t kHeads = 16 / DV;
  const int64_t row_bytes = DV * 16 * (q_heads / group) * sizeof(T);
  for (int64_t kv = 0; kv < q_heads / group; ++kv)
    for (int64_t h0 = kv * group; h0 < (kv + 1) * group; h0 += kHeads) {
      const int64_t ahead = h0 == 0 ? row_bytes : 0;
      by_heads<DV>(std::min(kHeads, (kv + 1) * group - h0), [&](auto heads) {
        weighted_values_of<DV, decltype(heads)::value>(scores, vrows, len, h0, kv, ahead, out);
      });
    }
}
#endif

// One query token per sequence against its cached context, read in place from the blocks its
// table names. Work item = one sequence: each cached token's keys (and values) of all KV heads
// are one contiguous row; the query heads sharing a KV head reuse it. T: the activations'
// type; C: the cache's.
template <typename T, typename C>
void decode_attention_impl(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const int64_t* tables,
                           int64_t table_width, const std::vector<int64_t>& ctx, double scale, Tensor& out) {
  const int64_t seqs = q.size(0), q_heads = q.size(1), d = q.size(2);
  const int64_t block = k_cache.size(1), kv_heads = k_cache.size(2), group = q_heads / kv_heads;
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), row = kv_heads * d;
  const T* qp = q.const_data_ptr<T>();
  const C* kc = k_cache.const_data_ptr<C>();
  const C* vc = v_cache.const_data_ptr<C>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t* lens = ctx.data();
  int64_t longest = 0, total = 0;
  for (int64_t n : ctx) {
    longest = std::max(longest, n);
    total += n;
  }
#if defined(__AVX512F__)
  const bool vector = d % 16 == 0 && !std::is_same_v<T, double>;
#else
  const bool vector = false;
#endif
  auto run = [=](int64_t begin, int64_t end) {
    std::vector<float> qf(q_heads * d), acc(q_heads * d), scores(q_heads * longest);
    std::vector<const C*> krows(longest), vrows(longest);
    std::vector<float> part(vector ? q_heads * 256 + 16 : 0);  // scores_by_16's partial sums, 64-byte aligned
    auto* parts = reinterpret_cast<float(*)[16][16]>((reinterpret_cast<uintptr_t>(part.data()) + 63) & ~uintptr_t{63});
    for (int64_t s = begin; s < end; ++s) {
      const int64_t len = lens[s];
      const int64_t* table = tables + s * table_width;
      for (int64_t h = 0; h < q_heads; ++h)
        for (int64_t i = 0; i < d; ++i) qf[h * d + i] = f32(qp[s * qs0 + h * qs1 + i]) * scale;
      // Row t of the context is row t % block of block table[t / block].
      for (int64_t t0 = 0; t0 < len; t0 += block)
        for (int64_t t = t0; t < std::min(len, t0 + block); ++t) {
          krows[t] = kc + (table[t0 / block] * block + t - t0) * row;
          vrows[t] = vc + (table[t0 / block] * block + t - t0) * row;
        }
      std::fill(acc.begin(), acc.end(), 0.f);
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<T, double>) {
        if (vector && d == 64) scores_by_16<4>(qf.data(), krows.data(), len, q_heads, group, d, scores.data(), parts);
        else if (vector && d == 128)
          scores_by_16<8>(qf.data(), krows.data(), len, q_heads, group, d, scores.data(), parts);
        else if (vector)
          scores_by_16<0>(qf.data(), krows.data(), len, q_heads, group, d, scores.data(), parts);
      }
#endif
      for (int64_t t = 0; t < len && !vector; ++t) {
        if (t + kAhead < len) prefetch(krows[t + kAhead], row * sizeof(C));
        prefetch(vrows[t], row * sizeof(C));  // read after the softmax: in cache by then
        for (int64_t h = 0; h < q_heads; ++h) scores[h * len + t] = dot(&qf[h * d], krows[t] + (h / group) * d, d);
      }
      for (int64_t h = 0; h < q_heads; ++h) softmax(&scores[h * len], len);
      bool done = false;
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<T, double>) {
        if (vector && d == 64) weighted_values<4>(scores.data(), vrows.data(), len, q_heads, group, acc.data());
        if (vector && d == 128) weighted_values<8>(scores.data(), vrows.data(), len, q_heads, group, acc.data());
        done = vector && (d == 64 || d == 128);
      }
#endif
      for (int64_t t = 0; t < len && !done; ++t)
        for (int64_t h = 0; h < q_heads; ++h) {
          const float p = scores[h * len + t];
          const C* v = vrows[t] + (h / group) * d;
          float* a = &acc[h * d];
          for (int64_t i = 0; i < d; ++i) a[i] += p * f32(v[i]);
        }
      for (int64_t h = 0; h < q_heads; ++h)
        for (int64_t i = 0; i < d; ++i) op[(s * q_heads + h) * d + i] = static_cast<T>(acc[h * d + i]);
    }
  };
  // Inline when the whole step is small (a short sequence or two). Else each thread takes a
  // run of rows of about equal work (context rows, plus a few for a row's own setup): split
  // by count, a prompt's rows (one query per token, contexts 1 .. n) gave the thread holding
  // the second half three times the work of the other.
  constexpr int64_t kRowSetup = 16;
  const int64_t tasks = total * q_heads * d < 8 * kParallelElements ? 1 : std::min<int64_t>(at::get_num_threads(), seqs);
  std::vector<int64_t> cut(tasks + 1, seqs);
  cut[0] = 0;
  for (int64_t s = 0, work = 0, p = 1; s < seqs && p < tasks; ++s) {
    work += lens[s] + kRowSetup;
    if (work * tasks >= p * (total + seqs * kRowSetup)) cut[p++] = s + 1;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) run(cut[p], cut[p + 1]);
  });
}

Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_tables,
                        at::IntArrayRef ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "expected q [seqs, heads, head_dim] with contiguous heads");
  const int64_t seqs = q.size(0), d = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) > 0 && q.size(1) % k_cache.size(2) == 0,
              "query heads must be a multiple of the cache's KV heads");
  check_cache(k_cache, v_cache, q, k_cache.size(2), d);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) >= seqs && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(),
              "expected contiguous int64 block tables, one row per sequence");
  TORCH_CHECK(static_cast<int64_t>(ctx_lens.size()) == seqs, "expected one context length per sequence");
  const int64_t width = block_tables.size(1), block = k_cache.size(1), blocks = k_cache.size(0);
  const int64_t* tables = block_tables.const_data_ptr<int64_t>();
  std::vector<int64_t> ctx(ctx_lens.begin(), ctx_lens.end());
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(ctx[s] >= 1 && ctx[s] <= width * block, "context length ", ctx[s], " does not fit its block table");
    for (int64_t b = 0; b < (ctx[s] + block - 1) / block; ++b) {
      const int64_t id = tables[s * width + b];
      TORCH_CHECK(id >= 0 && id < blocks, "block id ", id, " out of range [0, ", blocks, ")");
    }
  }
  Tensor out = at::empty({seqs, q.size(1), d}, q.options());
  dispatch_cache(q.scalar_type(), k_cache.scalar_type(), [&](auto t, auto c) {
    decode_attention_impl<decltype(t), decltype(c)>(q, k_cache, v_cache, tables, width, ctx, scale, out);
  });
  return out;
}

// silu(gate) * up over the merged gate/up projection's output [rows, 2 I] -> [rows, I],
// rounding after silu as the reference does.
template <typename T>
void silu_mul_row(const T* __restrict gate, const T* __restrict up, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = f32(gate[i]);
    out[i] = static_cast<T>(round_to<T>(g / (1.f + fast_exp(-g))) * f32(up[i]));
  }
}

template <typename T>
void silu_mul_impl(const T* x, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain(inter), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(x + r * 2 * inter, x + r * 2 * inter + inter, out + r * inter, inter);
  });
}

Tensor silu_mul(const Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "expected contiguous [rows, 2 * intermediate]");
  const int64_t inter = x.size(1) / 2;
  Tensor out = at::empty({x.size(0), inter}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_mul", [&] {
    silu_mul_impl<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(0), inter);
  });
  return out;
}

}  // namespace

namespace ringllm {  // ops.h: the same functions for decode_layer.cpp
Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  return ::rms_norm(x, w, eps);
}
Tensor add_rms_norm_(Tensor x, const Tensor& residual, const Tensor& w, double eps) {
  return ::add_rms_norm_(std::move(x), residual, w, eps);
}
void rope_kv(Tensor qkv, const Tensor& cos_sin, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping,
             int64_t q_heads, int64_t kv_heads) {
  ::rope_kv(std::move(qkv), cos_sin, std::move(k_cache), std::move(v_cache), slot_mapping, q_heads, kv_heads);
}
Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_tables,
                        at::IntArrayRef ctx_lens, double scale) {
  return ::decode_attention(q, k_cache, v_cache, block_tables, ctx_lens, scale);
}
Tensor silu_mul(const Tensor& x) {
  return ::silu_mul(x);
}
}  // namespace ringllm

TORCH_LIBRARY(ringllm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", rms_norm);
  m.def("add_rms_norm_(Tensor(a!) x, Tensor residual, Tensor weight, float eps) -> Tensor", add_rms_norm_);
  m.def(
      "rope_kv(Tensor(a!) qkv, Tensor cos_sin, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, "
      "int q_heads, int kv_heads) -> ()",
      rope_kv);
  m.def(
      "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, int[] ctx_lens, "
      "float scale) -> Tensor",
      decode_attention);
  m.def("silu_mul(Tensor x) -> Tensor", silu_mul);
}

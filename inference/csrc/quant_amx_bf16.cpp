// The quantized matmuls of prompts on AMX tiles: y = x @ W.T with x rounded to bf16 and W,
// from quant_amx.cpp's tile records, dequantized to bf16 one tile at a time (TDPBF16PS).
//
// Why: quant_amx.cpp's int8 products must turn every block's int32 sums into floats with
// that block's scales (a tile store and 16 vector multiply-adds per 16 rows and block),
// which made prompts slower there than on a bf16 copy of the weights. Here the scales go into
// the weights: a tile of 16 weight rows x 32 columns is dequantized once (w = code * scale +
// min, rounded to bf16 as `weight.to(torch.bfloat16)` rounds it) once a call, and multiplied
// by 80 activation rows at a time, whose sums stay in C tiles across the whole row. No bf16 copy of the
// weights is needed (2 bytes a weight), and prompt activations keep bf16's precision, as
// they did with the copy (int8-rounded prompts changed the int4 default model's answers).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "amx_tiles.h"
#include "quant_amx.h"
#include "quant_rows.h"

namespace ringllm::amx {
#if defined(RINGLLM_AMX)
namespace {

constexpr int64_t kRowTiles = 5;  // C tiles 0..4: 80 activation rows per pass over the weight tiles

// Every tile 16 rows x 64 bytes: C tiles 0..4 (float32 16 x 16), A tiles 5 and 6 in turn (16
// activation rows x 32 bf16; two, so a load need not wait for the last product to read its
// tile), B tile 7 (32 columns of 16 weight rows as bf16 pairs).
void load_bf16_config() {
  static const TileConfig config = [] {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = kTileRows, cfg.colsb[t] = 64;
    return cfg;
  }();
  load_config(config);
}

// One record's weights as a bf16 B tile: w = code * scale + min for each of the 16 weight
// rows (scale, min: 16 floats). Tile row p holds, for each weight row, columns 2p and 2p + 1.
template <bool Q4>
ALWAYS_INLINE void dequant_tile(const uint8_t* record, __m512 scale, __m512 min, uint16_t* buf) {
  __m512 s[4], o[4];
  for (int c = 0; c < 4; ++c) {  // [scale of row 4c x 4, of row 4c + 1 x 4, ...]
    const __m512i idx = _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2, 4 * c + 2, 4 * c + 2,
                                         4 * c + 2, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c, 4 * c, 4 * c, 4 * c);
    s[c] = _mm512_permutexvar_ps(idx, scale);
    o[c] = _mm512_permutexvar_ps(idx, min);
  }
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  alignas(64) uint8_t bytes[kTileBytes];
  const uint8_t* src = record;
  if constexpr (Q4) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int d = 0; d < 4; ++d) {
      const __m512i v = _mm512_load_si512(record + 64 * d);
      _mm512_store_si512(bytes + 64 * d, _mm512_and_si512(v, low4));
      _mm512_store_si512(bytes + 256 + 64 * d, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
    }
    src = bytes;
  }
#pragma GCC unroll 8
  for (int d = 0; d < 8; ++d) {  // int8 tile row d: columns 4d .. 4d + 3 of each weight row
    __m512 f[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c)
      f[c] = _mm512_fmadd_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(src + 64 * d + 16 * c)))),
          s[c], o[c]);
    const __m512i lo = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0]));
    const __m512i hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[3], f[2]));
    _mm512_store_si512(buf + 64 * d, _mm512_permutex2var_epi32(lo, even, hi));
    _mm512_store_si512(buf + 64 * d + 32, _mm512_permutex2var_epi32(lo, odd, hi));
  }
}

// C tile C (activation rows m0 + 16 C ..) += its rows, loaded into A tile A, times B tile 7
// (the intrinsics take tile numbers as literals).
#define RINGLLM_PRODUCT(C, A)                         \
  if (tiles_m > C) {                                  \
    _tile_loadd(A, ab + C * blocks * kTileBytes, 64); \
    _tile_dpbf16ps(C, A, 7);                          \
  }
// C tile C to rows m0 + 16 C .. of y.
#define RINGLLM_STORE(C)       \
  if (tiles_m > C) {           \
    _tile_stored(C, c, 64);    \
    out(C);                    \
  }

// y = x @ W.T with x rounded to bf16 and W dequantized to bf16 tile by tile, float sums.
template <bool Q4>
void dense_tiles(const at::Tensor& x, const uint8_t* tiles, const c10::Half* mins, const float* scale, int64_t n,
                 float* y) {
  const int64_t m = x.size(0), k = x.size(1), blocks = k / kBlock, record = record_bytes(Q4);
  const int64_t padded = (m + kTileRows - 1) / kTileRows * kTileRows;
  // The activations as bf16 A tiles, each 16 rows x 32 columns in one KiB: [padded / 16][blocks][16][32].
  std::vector<uint16_t> a(padded * k, 0);
  auto to_tiles = [&](auto convert) {
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t b = 0; b < blocks; ++b) convert(r, b, a.data() + ((r / 16 * blocks + b) * 16 + r % 16) * kBlock);
    });
  };
  if (x.scalar_type() == at::kBFloat16) {
    const at::BFloat16* xb = x.const_data_ptr<at::BFloat16>();
    to_tiles([&](int64_t r, int64_t b, uint16_t* dst) { std::memcpy(dst, xb + r * k + b * kBlock, kBlock * 2); });
  } else {
    const float* xf = x.const_data_ptr<float>();
    to_tiles([&](int64_t r, int64_t b, uint16_t* dst) {
      const float* src = xf + r * k + b * kBlock;
      _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src))));
    });
  }
  // A task is 16 weight rows: it dequantizes them into `panel` while it multiplies the first
  // 80 activation rows, and the next 80 read the panel. (Up to kLongRows rows come here: their
  // activations, at most 768 KiB, stay in a core's L2 while the weights stream past.)
  const int64_t chunk = kRowTiles * kTileRows;
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    load_bf16_config();
    std::vector<__m512i> panel(blocks * 16);  // the weight rows' B tiles, 1 KiB each
    alignas(64) float c[kTileRows][16];
    for (int64_t gi = begin; gi < end; ++gi) {
      const uint8_t* group = tiles + gi * blocks * record;
      const int64_t g = gi * 16;
      __m512 s = Q4 ? _mm512_setzero_ps() : _mm512_loadu_ps(scale + g);
      __m512 o = _mm512_mul_ps(s, _mm512_set1_ps(-128.f));  // q8 codes carry +128
      for (int64_t m0 = 0; m0 < padded; m0 += chunk) {
        const int64_t tiles_m = std::min(kRowTiles, (padded - m0) / kTileRows);
        const uint16_t* a0 = a.data() + m0 * k;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        _tile_zero(4);  // (zeroing a tile this chunk leaves unused costs less than a branch)
        for (int64_t b = 0; b < blocks; ++b) {
          uint16_t* tile = reinterpret_cast<uint16_t*>(panel.data() + b * 16);
          if (m0 == 0) {
            const uint8_t* rec = group + b * record;
            if constexpr (Q4) {
              s = _mm512_load_ps(reinterpret_cast<const float*>(rec + kTileBytes / 2));
              o = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + b * n + g)));
            }
            dequant_tile<Q4>(rec, s, o, tile);
          }
          const uint16_t* ab = a0 + b * kTileBytes;
          _tile_loadd(7, tile, 64);
          RINGLLM_PRODUCT(0, 5)
          RINGLLM_PRODUCT(1, 6)
          RINGLLM_PRODUCT(2, 5)
          RINGLLM_PRODUCT(3, 6)
          RINGLLM_PRODUCT(4, 5)
        }
        auto out = [&](int t) {
          const int64_t r0 = m0 + t * kTileRows;
          for (int64_t r = 0; r < kTileRows && r0 + r < m; ++r) std::memcpy(y + (r0 + r) * n + g, c[r], 64);
        };
        RINGLLM_STORE(0)
        RINGLLM_STORE(1)
        RINGLLM_STORE(2)
        RINGLLM_STORE(3)
        RINGLLM_STORE(4)
      }
    }
    _tile_release();
  });
}

// W as bf16 from 32-column blocks: `block(r, b)` gives block b of row r as floats in two
// halves (columns 0..15, 16..31). Up to 64 MiB, into a buffer this thread keeps for its next
// call: a fresh one of a few MiB cost its page faults again every time (a third of the call).
template <typename BlockFn>
at::Tensor weight_bf16(int64_t n, int64_t k, BlockFn block) {
  constexpr int64_t kKeep = int64_t{32} << 20;  // bf16 elements
  thread_local at::Tensor scratch = at::empty({0}, at::TensorOptions().dtype(at::kBFloat16));
  at::Tensor w;
  if (n * k > kKeep) {
    w = at::empty({n, k}, scratch.options());  // e.g. a big vocabulary's LM head: not kept
  } else {
    if (scratch.numel() < n * k) scratch = at::empty({n * k}, scratch.options());
    w = scratch.narrow(0, 0, n * k).view({n, k});
  }
  uint16_t* out = reinterpret_cast<uint16_t*>(w.mutable_data_ptr<at::BFloat16>());
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t b = 0; b < k / kBlock; ++b) {
        const auto [lo, hi] = block(r, b);
        _mm512_storeu_si512(out + r * k + b * kBlock, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
  });
  return w;
}

}  // namespace

at::Tensor q4_weight_bf16(const uint8_t* codes, const c10::Half* scales, const c10::Half* mins, int64_t n, int64_t k) {
  const int64_t blocks = k / kBlock;
  return weight_bf16(n, k, [&](int64_t r, int64_t b) {
    // Block b of row r: 16 bytes, code j in the low nibble of byte j, code j + 16 in the high one.
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (r * blocks + b) * 16));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m512 d = _mm512_set1_ps(static_cast<float>(scales[r * blocks + b]));
    const __m512 mn = _mm512_set1_ps(static_cast<float>(mins[b * n + r]));
    auto dequant = [&](__m128i q) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q)), d, mn); };
    return std::pair{dequant(_mm_and_si128(v, low4)), dequant(_mm_and_si128(_mm_srli_epi16(v, 4), low4))};
  });
}

at::Tensor q8_weight_bf16(const uint8_t* codes, const float* scale, int64_t n, int64_t k) {
  return weight_bf16(n, k, [&](int64_t r, int64_t b) {
    const uint8_t* q = codes + r * k + b * kBlock;
    const __m512 s = _mm512_set1_ps(scale[r]), o = _mm512_set1_ps(-128.f * scale[r]);  // codes carry +128
    auto dequant = [&](const uint8_t* p) {
      return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))),
                             s, o);
    };
    return std::pair{dequant(q), dequant(q + 16)};
  });
}

void q4_dense(const at::Tensor& x, const uint8_t* tiles, const c10::Half* mins, int64_t n, float* y) {
  dense_tiles<true>(x, tiles, mins, nullptr, n, y);
}

void q8_dense(const at::Tensor& x, const uint8_t* tiles, const float* scale, int64_t n, float* y) {
  dense_tiles<false>(x, tiles, nullptr, scale, n, y);
}
#else
at::Tensor q4_weight_bf16(const uint8_t*, const c10::Half*, const c10::Half*, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AMX");
}
at::Tensor q8_weight_bf16(const uint8_t*, const float*, int64_t, int64_t) {
  TORCH_CHECK(false, "built without AMX");
}
void q4_dense(const at::Tensor&, const uint8_t*, const c10::Half*, int64_t, float*) {
  TORCH_CHECK(false, "built without AMX");
}
void q8_dense(const at::Tensor&, const uint8_t*, const float*, int64_t, float*) {
  TORCH_CHECK(false, "built without AMX");
}
#endif
}  // namespace ringllm::amx

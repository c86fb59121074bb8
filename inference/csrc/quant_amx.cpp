// The quantized matmuls for batches, on AMX tiles (Intel Xeon from Sapphire Rapids on).
//
// Why: quant_ops.cpp's kernels multiply with AVX512-VNNI, where every 128 products also cost
// a convert and a float multiply-add for the block scales; a batch of 16 rows there took 9x
// the time of one row. One AMX tile instruction does 16 x 16 x 32 products: the default
// model's 30 layers of matmuls for 16 rows take 16 ms here where VNNI took 39 (one row: 7).
//
// Same rounding as quant_ops.cpp (quant_rows.h: activations to int8 per block of 32), so a
// row gets the same answer alone or in a batch, up to the order of float sums. The weights
// come a second time, as B tiles made at load (inference/layers/quant_native.py,
// `tile_records`): for each 16 weight rows and block of 32 columns, a record of a B tile, 8
// tile rows x 64 bytes, tile row d holding columns 4d .. 4d + 3 of each of the 16 weight rows
// in turn as unsigned bytes (what TDPBSUD multiplies against 4 adjacent signed activation
// bytes). q4 records hold the tile as nibbles (rows 4..7 in the high ones of rows 0..3: the
// same bytes a weight as the codes) and then the 16 rows' block scales as float32. One
// TDPBSUD per 16 activation rows and block gives int32 dot products that the block's scales
// turn into float, as the VNNI kernels do.

#include "quant_amx.h"

#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "quant_rows.h"

#if defined(RINGLLM_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ringllm::amx {
namespace {

// Below this many rows the VNNI kernels win: a tile always multiplies 16 rows.
constexpr int64_t kMinRows = 4;

bool env_off() {
  const char* v = std::getenv("RINGLLM_AMX");
  return v != nullptr && (std::strcmp(v, "off") == 0 || std::strcmp(v, "0") == 0);
}

#if defined(RINGLLM_AMX)
bool os_grants_tiles() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 25))) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // Linux: ask for the tile state once per process
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

// Two sets (tile_product): A tiles 0, 1 (16 activation rows x 32 int8), C tiles 2, 3
// (int32 16 x 16), B tiles 4, 5 (a block's codes, 8 rows x 64 bytes).
void load_tile_config() {
  static const TileConfig config = [] {
    TileConfig cfg;
    for (int t = 0; t < 2; ++t) {
      cfg.rows[t] = kTileRows, cfg.colsb[t] = kBlock;
      cfg.rows[t + 2] = kTileRows, cfg.colsb[t + 2] = 64;
      cfg.rows[t + 4] = kBlock / 4, cfg.colsb[t + 4] = 64;
    }
    return cfg;
  }();
  load_config(config);
}

// The activations of one call: int8 [rows rounded up to 16, k] (zero past the last row),
// each block's scale and float sum [padded rows, blocks], and (q8) each row's offset.
struct Rows {
  int64_t m, padded, k, blocks;
  std::vector<int8_t> q;
  std::vector<float> scales, sums, offsets;
};

template <typename T>
Rows quantize(const T* x, int64_t m, int64_t k, bool offsets) {
  const int64_t blocks = k / kBlock, padded = (m + kTileRows - 1) / kTileRows * kTileRows;
  Rows r{m, padded, k, blocks, std::vector<int8_t>(padded * k, 0), std::vector<float>(padded * blocks, 0.f),
         std::vector<float>(padded * blocks, 0.f), std::vector<float>(offsets ? m : 0)};
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      int8_t* q = r.q.data() + row * k;
      float* scales = r.scales.data() + row * blocks;
      quantize_blocks(x + row * k, k, q, scales, r.sums.data() + row * blocks);
      if (!offsets) continue;
      double offset = 0.0;  // as quant_ops.cpp: 128 * sum of q * scale, what the codes' +128 adds
      for (int64_t b = 0; b < blocks; ++b) {
        int64_t qsum = 0;
        for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i) qsum += q[i];
        offset += 128.0 * static_cast<double>(qsum) * scales[b];
      }
      r.offsets[row] = static_cast<float>(offset);
    }
  });
  return r;
}

Rows quantize_any(const at::Tensor& x, bool offsets) {
  const int64_t m = x.size(0), k = x.size(1);
  if (x.scalar_type() == at::kBFloat16) return quantize(x.const_data_ptr<at::BFloat16>(), m, k, offsets);
  return quantize(x.const_data_ptr<float>(), m, k, offsets);
}

// The int32 products of activation rows m0 .. m0 + 15 and one block's B tile, into C tile C.
// Two C tiles take turns (2 for even blocks, 3 for odd), so the tile unit multiplies the next
// block while the vector unit scales this one; each has its own A and B tiles (0 and 4, 1 and
// 5), so neither waits on the other's loads. (The intrinsics take tile numbers as literals.)
template <int C>
ALWAYS_INLINE void tile_product(const int8_t* a, int64_t stride, const uint8_t* b_tile) {
  if constexpr (C == 2) {
    _tile_zero(2);
    _tile_loadd(0, a, stride);
    _tile_loadd(4, b_tile, 64);
    _tile_dpbsud(2, 0, 4);
  } else {
    _tile_zero(3);
    _tile_loadd(1, a, stride);
    _tile_loadd(5, b_tile, 64);
    _tile_dpbsud(3, 1, 5);
  }
}

// Block b's B tile: q8 records are one; q4 records hold it as nibbles (tile rows 0..3 low,
// 4..7 high: half the bytes to read), unpacked here into `buf`.
template <bool Q4>
ALWAYS_INLINE const uint8_t* b_tile(const uint8_t* record, uint8_t* buf) {
  if constexpr (!Q4) {
    return record;
  } else {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_load_si512(record + 64 * i);
      _mm512_store_si512(buf + 64 * i, _mm512_and_si512(v, low4));
      _mm512_store_si512(buf + 256 + 64 * i, _mm512_and_si512(_mm512_srli_epi16(v, 4), low4));
    }
    return buf;
  }
}

// acc[r] += each block's int32 products for activation row m0 + r times its scales, through
// `block(b, products, acc)`; R: rows live, a compile-time constant so acc stays in registers.
template <bool Q4, int R, typename BlockFn>
ALWAYS_INLINE void tile_rows(const Rows& a, int64_t m0, const uint8_t* records, int64_t record, __m512* acc,
                             BlockFn block) {
  alignas(64) int32_t c[2][kTileRows][16];
  alignas(64) uint8_t bufs[2][kTileBytes];
  const int8_t* q = a.q.data() + m0 * a.k;
  const int64_t k = a.k, blocks = a.blocks;
  auto b_of = [&](int64_t b) { return b_tile<Q4>(records + b * record, bufs[b % 2]); };
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  if (blocks > 0) tile_product<2>(q, k, b_of(0));
  for (int64_t b = 0; b < blocks; b += 2) {
    if (b + 1 < blocks) tile_product<3>(q + (b + 1) * kBlock, k, b_of(b + 1));
    _tile_stored(2, c[0], 64);
    if (b + 2 < blocks) tile_product<2>(q + (b + 2) * kBlock, k, b_of(b + 2));
    block(b, c[0], acc);
    if (b + 1 < blocks) {
      _tile_stored(3, c[1], 64);
      block(b + 1, c[1], acc);
    }
  }
}

// Runs `group(g, m0, live)` for each 16 weight rows g and 16 activation rows m0, the weight
// rows split over the threads.
template <typename GroupFn>
void for_groups(const Rows& a, int64_t n, GroupFn group) {
  // At least ~64 KiB of tile products a task: less costs more to hand out than to run.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (a.padded * a.k));
  at::parallel_for(0, n / 16, grain, [&](int64_t begin, int64_t end) {
    load_tile_config();
    for (int64_t gi = begin; gi < end; ++gi)
      for (int64_t m0 = 0; m0 < a.m; m0 += kTileRows) group(gi * 16, m0, std::min(kTileRows, a.m - m0));
    _tile_release();
  });
}

// The row count rounded up to 4 as a compile-time constant, so the accumulators stay in
// registers (rows past the batch are zero and never stored).
template <typename Fn>
ALWAYS_INLINE void by_rows(int64_t live, Fn fn) {
  if (live > 12) fn(std::integral_constant<int, 16>{});
  else if (live > 8) fn(std::integral_constant<int, 12>{});
  else if (live > 4) fn(std::integral_constant<int, 8>{});
  else fn(std::integral_constant<int, 4>{});
}
#endif

}  // namespace

int64_t record_bytes(bool q4) {
  return q4 ? 256 + 16 * 4 : 512;  // a B tile (q4: as nibbles), then (q4) 16 float32 scales
}

bool ready() {
#if defined(RINGLLM_AMX)
  static const bool ok = !env_off() && os_grants_tiles();
  return ok;
#else
  return false;
#endif
}

bool usable(int64_t m, int64_t n, int64_t k) {
  return m >= kMinRows && n % 16 == 0 && k % kBlock == 0 && ready();
}

#if defined(RINGLLM_AMX)
void q4_linear(const at::Tensor& x, const uint8_t* tiles, const c10::Half* mins, int64_t n, float* y) {
  const Rows a = quantize_any(x, false);
  const int64_t blocks = a.blocks, record = record_bytes(true);
  for_groups(a, n, [&](int64_t g, int64_t m0, int64_t live) {
    const uint8_t* group = tiles + g / 16 * blocks * record;
    const float* xs = a.scales.data() + m0 * blocks;
    const float* sums = a.sums.data() + m0 * blocks;
    by_rows(live, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      __m512 acc[R];
      tile_rows<true, R>(a, m0, group, record, acc, [&](int64_t b, const int32_t(*c)[16], __m512* acc) {
        // The block's 16 weight scales (after its tile) and mins (stored [blocks, n]).
        const __m512 w = _mm512_load_ps(reinterpret_cast<const float*>(group + b * record + kTileBytes / 2));
        const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + b * n + g)));
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_load_si512(c[r]));
          acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(w, _mm512_set1_ps(xs[r * blocks + b])), acc[r]);
          acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(sums[r * blocks + b]), acc[r]);
        }
      });
      for (int r = 0; r < R && r < live; ++r) _mm512_storeu_ps(y + (m0 + r) * n + g, acc[r]);
    });
  });
}

void q8_linear(const at::Tensor& x, const uint8_t* tiles, const float* scale, int64_t n, float* y) {
  const Rows a = quantize_any(x, true);
  const int64_t blocks = a.blocks, record = record_bytes(false);
  for_groups(a, n, [&](int64_t g, int64_t m0, int64_t live) {
    const uint8_t* group = tiles + g / 16 * blocks * record;
    const float* xs = a.scales.data() + m0 * blocks;
    by_rows(live, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      __m512 acc[R];
      tile_rows<false, R>(a, m0, group, record, acc, [&](int64_t b, const int32_t(*c)[16], __m512* acc) {
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          acc[r] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[r])), _mm512_set1_ps(xs[r * blocks + b]), acc[r]);
      });
      const __m512 s = _mm512_loadu_ps(scale + g);
      for (int r = 0; r < R && r < live; ++r)  // the offset takes back the +128 of every code
        _mm512_storeu_ps(y + (m0 + r) * n + g,
                         _mm512_mul_ps(_mm512_sub_ps(acc[r], _mm512_set1_ps(a.offsets[m0 + r])), s));
    });
  });
}
#else
void q4_linear(const at::Tensor&, const uint8_t*, const c10::Half*, int64_t, float*) {
  TORCH_CHECK(false, "built without AMX");
}
void q8_linear(const at::Tensor&, const uint8_t*, const float*, int64_t, float*) {
  TORCH_CHECK(false, "built without AMX");
}
#endif

}  // namespace ringllm::amx

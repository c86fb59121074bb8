// What quant_amx.cpp (int8 products) and quant_amx_bf16.cpp (bf16 products) share: whether
// this build has AMX, the tile sizes, and loading a tile configuration.
#pragma once

#include <cstdint>

// Both kernels or neither: CPUs with AMX-INT8 (Sapphire Rapids on) have AMX-BF16 too.
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512BF16__) && defined(__linux__)
#define RINGLLM_AMX 1
#include <immintrin.h>

#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace ringllm::amx {

constexpr int64_t kTileRows = 16;    // activation rows per A and C tile
constexpr int64_t kTileBytes = 512;  // one int8 B tile: 8 rows x 64 bytes (32 columns of 16 weight rows)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

ALWAYS_INLINE void load_config(const TileConfig& config) {
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes only: the barrier keeps every
  // store to the config before it.
  asm volatile("" ::: "memory");
  _tile_loadconfig(&config);
}

}  // namespace ringllm::amx
#endif

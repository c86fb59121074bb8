// Fetching a run of bytes into cache ahead of its use, for the kernels whose rows the hardware
// prefetcher does not follow (paged KV blocks, quantized weight rows read once).
#pragma once

#include <cstdint>

namespace ringllm {

inline __attribute__((always_inline)) void prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off);
}

}  // namespace ringllm

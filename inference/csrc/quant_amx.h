// The quantized matmuls on AMX tiles (quant_amx.cpp), for batches: quant_ops.cpp's kernels
// hand a call over when the weight has tile records and `usable` says so.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ringllm::amx {

// Compiled for AMX-INT8, the CPU has it, the OS lets this process use tile data, and
// RINGLLM_AMX is not "off".
bool ready();

// Whether a call of m activation rows against an [n, k] weight goes to the tiles.
bool usable(int64_t m, int64_t n, int64_t k);

// Bytes of one weight tile record (16 weight rows, 32 columns): a B tile, plus for q4 the 16
// rows' block scales as float32. Records are stored [n / 16, k / 32, record_bytes].
int64_t record_bytes(bool q4);

// y [m, n] (float32, preallocated) = x [m, k] @ W.T, x float32 or bfloat16 and contiguous,
// W as tile records (and for q4 the mins [k / 32, n] of quant_ops.cpp's format).
void q4_linear(const at::Tensor& x, const uint8_t* tiles, const c10::Half* mins, int64_t n, float* y);
void q8_linear(const at::Tensor& x, const uint8_t* tiles, const float* scale, int64_t n, float* y);

}  // namespace ringllm::amx

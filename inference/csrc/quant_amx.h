// The quantized matmuls on AMX tiles, for batches: quant_ops.cpp's kernels hand a call over
// when the weight has tile records and `usable` says so, and pick by its rows (`on_amx`):
// below kDenseRows quant_amx.cpp multiplies int8 activations by the codes; below kLongRows
// (prompts) quant_amx_bf16.cpp multiplies bf16 activations by weights dequantized to bf16;
// from there torch multiplies by the whole weight dequantized to bf16.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace ringllm::amx {

// Compiled for AMX-INT8 and AMX-BF16, the CPU has them, the OS lets this process use tile data, and
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

// The same with x rounded to bf16 and W dequantized to bf16 tile by tile (quant_amx_bf16.cpp),
// for kDenseRows rows and more: their cost is dequantizing each weight tile once a call, where
// q4_linear / q8_linear scale every 16 rows' products block by block (the default model's 30
// layers, 2 cores: 24 rows 13 ms against 15-18, 89 rows 28-31 against 44-48). Below it the two
// cost about the same, and those round the activations as the one-row VNNI kernels do, so a
// sequence gets the same answer alone or in a small batch.
constexpr int64_t kDenseRows = 24;
void q4_dense(const at::Tensor& x, const uint8_t* tiles, const c10::Half* mins, int64_t n, float* y);
void q8_dense(const at::Tensor& x, const uint8_t* tiles, const float* scale, int64_t n, float* y);

// From this many rows on a bf16 matmul by torch (oneDNN's AMX kernels) beats q4_dense /
// q8_dense, even counting the weight's dequantization for each call (the default model's 30
// layers, 2 cores: 512 rows 99 ms by oneDNN against 128 by q4_dense; 89 rows 35 against 27).
constexpr int64_t kLongRows = 256;
// W as bf16 [n, k] from quant_ops.cpp's row-major codes, for those calls.
at::Tensor q4_weight_bf16(const uint8_t* codes, const c10::Half* scales, const c10::Half* mins, int64_t n, int64_t k);
at::Tensor q8_weight_bf16(const uint8_t* codes, const float* scale, int64_t n, int64_t k);

}  // namespace ringllm::amx

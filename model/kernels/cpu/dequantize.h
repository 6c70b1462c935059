// dequantize_bf16: packed [N, K] -> bfloat16 [N, K]; prefers_bf16_gemm: whether qlinear multiplies M rows that way.
#pragma once

#include "quant_types.h"

namespace dots_cpu {

constexpr int64_t kDequantizeMinRows = 16;  // measured: from 8-16 rows on, bf16 oneDNN beats the int8 row kernels

at::Tensor dequantize_bf16(const QuantWeight& w);
void unpack_row(const QuantWeight& w, const uint8_t* lo, const uint8_t* hi, uint8_t* codes);  // codes [K] of a row
bool prefers_bf16_gemm(int64_t rows);

}  // namespace dots_cpu

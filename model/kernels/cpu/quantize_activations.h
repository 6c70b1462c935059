// quantize_activations: x float32 or bfloat16 [M, K] (K % 32 == 0, rows contiguous) -> QuantActivations.
#pragma once

#include "quant_types.h"

namespace dots_cpu {

QuantActivations allocate_activations(int64_t m, int64_t k);
QuantActivations quantize_activations(const at::Tensor& x);
// Quantizes float32 rows [row0, row1) of src (row stride ld) into the same rows of act.
void quantize_rows(const float* src, int64_t ld, int64_t row0, int64_t row1, QuantActivations& act);

}  // namespace dots_cpu

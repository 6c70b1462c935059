// Shared types of the CPU quantized kernels: views of a packed weight (see model/quant/packed.py), quantized
// activations, one unit of matmul work, and the instruction-set choice.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dots_cpu {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

Isa best_isa();             // what this CPU runs
Isa active_isa();           // what the kernels use now (<= best)
void set_isa(Isa isa);      // capped at best_isa()

// One [N, K] matrix of a packed weight, or expert e of a stack through expert().
struct QuantWeight {
  int bits = 0, group = 0, zero = 0;
  int64_t n = 0, k = 0;
  const uint8_t* lo = nullptr;      // [N, lo_row]
  const uint8_t* hi = nullptr;      // [N, hi_row] or null
  const at::Half* scale = nullptr;  // [N, K / group]
  const at::Half* min = nullptr;    // [N, K / group] or null
  int64_t lo_row = 0, hi_row = 0;

  QuantWeight expert(int64_t e) const;
};

// Per 32-element block of each row: int8 codes q = round(x / d), d = max|x| / 127; per group of 16 and of 32:
// dx = d and xs = d * sum(q) (the activation side of the zero-point and min corrections).
struct QuantActivations {
  int64_t m = 0, k = 0;
  at::Tensor storage;  // one allocation holding the arrays below
  int8_t* q = nullptr;  // [M, K]
  float *dx32 = nullptr, *xs32 = nullptr, *dx16 = nullptr, *xs16 = nullptr;  // [M, K / 32] x2, [M, K / 16] x2

  const int8_t* row(int64_t r) const { return q + r * k; }
  const float* dx(int group, int64_t r) const { return group == 16 ? dx16 + r * (k / 16) : dx32 + r * (k / 32); }
  const float* xs(int group, int64_t r) const { return group == 16 ? xs16 + r * (k / 16) : xs32 + r * (k / 32); }
};

// out[out_row(i), n] = sum_k w[n, k] * act[act_row(i), k] for i < m, n0 <= n < n1; rows are identity when null.
struct GemmJob {
  QuantWeight w;
  int64_t n0 = 0, n1 = 0;
  int64_t m = 0;
  const int32_t* act_rows = nullptr;
  float* out = nullptr;
  int64_t ldo = 0;
  const int32_t* out_rows = nullptr;
};

QuantWeight make_weight(const std::vector<c10::optional<at::Tensor>>& tensors, const std::vector<int64_t>& format,
                        int64_t dims);
void run_jobs(const std::vector<GemmJob>& jobs, const QuantActivations& act);
int64_t rows_per_job(int64_t total_rows);

}  // namespace dots_cpu

// qlinear: x float32/bfloat16 [M, K] @ w^T, w a packed [N, K] weight -> y float32 [M, N].
// qlinear_shared_input: one x, several weights [N_i, K] -> [y_i [M, N_i]], x quantized once.
// A bfloat16 x of kDequantizeMinRows rows or more (CPUs with AVX-512 BF16) is multiplied by oneDNN with each weight
// dequantized to bfloat16 instead (dequantize.cpp); its result is bfloat16-rounded, as a bfloat16 model rounds it anyway.
// Work is (weight, tile of output rows) jobs taken from one shared counter by ATen's threads; a job runs its activation
// rows in register tiles, each sweeping the job's weight rows while they stay in cache.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "dequantize.h"
#include "quant_types.h"
#include "quantize_activations.h"

#define QK_NS isa_avx512
#define QK_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2"
#define QK_AVX512 1
#include "simd_kernels.h"
#undef QK_NS
#undef QK_TARGET
#undef QK_AVX512

#define QK_NS isa_avx2
#define QK_TARGET "avx2,fma,f16c"
#define QK_AVX512 0
#include "simd_kernels.h"
#undef QK_NS
#undef QK_TARGET
#undef QK_AVX512

namespace dots_cpu {
namespace {

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
  return Isa::scalar;
}

Isa isa_from_env(Isa best) {
  const char* name = std::getenv("DOTS_SERVE_CPU_ISA");
  if (!name || !*name) return best;
  const std::string s(name);
  const Isa wanted = s == "scalar" ? Isa::scalar : s == "avx2" ? Isa::avx2 : Isa::avx512;
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

std::atomic<int> g_isa{static_cast<int>(isa_from_env(detect_isa()))};

void run_job_scalar(const GemmJob& job, const QuantActivations& act) {
  const QuantWeight& w = job.w;
  const int64_t groups = w.k / w.group;
  std::vector<uint8_t> codes(w.k);
  for (int64_t n = job.n0; n < job.n1; ++n) {
    unpack_row(w, w.lo + n * w.lo_row, w.hi ? w.hi + n * w.hi_row : nullptr, codes.data());
    for (int64_t i = 0; i < job.m; ++i) {
      const int64_t r = job.act_rows ? job.act_rows[i] : i;
      const int8_t* xq = act.row(r);
      const float* dx = act.dx(w.group, r);
      const float* xs = act.xs(w.group, r);
      float y = 0.f, corr = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k) dot += codes[k] * xq[k];
        const float sw = static_cast<float>(w.scale[n * groups + g]);
        const float mn = w.min ? static_cast<float>(w.min[n * groups + g]) : 0.f;
        y += sw * dx[g] * static_cast<float>(dot);
        corr += (sw * static_cast<float>(w.zero) + mn) * xs[g];
      }
      job.out[(job.out_rows ? job.out_rows[i] : i) * job.ldo + n] = y - corr;
    }
  }
}

void run_job(const GemmJob& job, const QuantActivations& act, Isa isa, float* scratch) {
  switch (isa) {
    case Isa::avx512: isa_avx512::run_job(job, act, scratch); break;
    case Isa::avx2: isa_avx2::run_job(job, act, scratch); break;
    default: run_job_scalar(job, act); break;
  }
}

const uint8_t* bytes_of(const c10::optional<at::Tensor>& t, int64_t dims, const char* what) {
  TORCH_CHECK(t.has_value() && t->scalar_type() == at::kByte, what, " must be a uint8 tensor");
  TORCH_CHECK(t->dim() == dims && t->is_contiguous(), what, " must be a contiguous ", dims, "-d tensor");
  return t->data_ptr<uint8_t>();
}

const at::Half* halves_of(const c10::optional<at::Tensor>& t, int64_t dims, const char* what) {
  TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == dims && t->is_contiguous(), what,
              " must be a contiguous float16 ", dims, "-d tensor");
  return t->data_ptr<at::Half>();
}

}  // namespace

Isa best_isa() { return detect_isa(); }
Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }
void set_isa(Isa isa) {
  const Isa best = detect_isa();
  g_isa.store(static_cast<int>(static_cast<int>(isa) < static_cast<int>(best) ? isa : best));
}

QuantWeight QuantWeight::expert(int64_t e) const {
  QuantWeight w = *this;
  w.lo += e * n * lo_row;
  if (w.hi) w.hi += e * n * hi_row;
  w.scale += e * n * (k / group);
  if (w.min) w.min += e * n * (k / group);
  return w;
}

// tensors (lo, hi, scale, min) with dims dims each (2: a matrix, 3: a stack), format (bits, group, zero).
QuantWeight make_weight(const std::vector<c10::optional<at::Tensor>>& tensors, const std::vector<int64_t>& format,
                        int64_t dims) {
  TORCH_CHECK(tensors.size() == 4 && format.size() == 3, "a packed weight is (lo, hi, scale, min), (bits, group, zero)");
  QuantWeight w;
  w.bits = static_cast<int>(format[0]);
  w.group = static_cast<int>(format[1]);
  w.zero = static_cast<int>(format[2]);
  TORCH_CHECK(w.bits == 4 || w.bits == 5 || w.bits == 6 || w.bits == 8, "bits must be 4, 5, 6 or 8, got ", w.bits);
  TORCH_CHECK(w.group == 16 || w.group == 32, "group size must be 16 or 32, got ", w.group);
  w.lo = bytes_of(tensors[0], dims, "lo");
  w.lo_row = tensors[0]->size(-1);
  w.n = tensors[0]->size(-2);
  w.k = w.bits == 8 ? w.lo_row : 2 * w.lo_row;
  TORCH_CHECK(w.k % 32 == 0, "K (", w.k, ") must be a multiple of 32");
  if (w.bits == 5 || w.bits == 6) {
    w.hi = bytes_of(tensors[1], dims, "hi");
    w.hi_row = tensors[1]->size(-1);
    TORCH_CHECK(w.hi_row == w.k / 32 * 4 * (w.bits - 4), "hi has ", w.hi_row, " bytes per row, expected ",
                w.k / 32 * 4 * (w.bits - 4));
  }
  w.scale = halves_of(tensors[2], dims, "scale");
  TORCH_CHECK(tensors[2]->size(-1) == w.k / w.group && tensors[2]->size(-2) == w.n, "scale must be [..., ", w.n, ", ",
              w.k / w.group, "]");
  TORCH_CHECK(tensors[0]->numel() / w.lo_row == tensors[2]->numel() / (w.k / w.group), "lo and scale disagree on rows");
  if (tensors[3].has_value()) {
    w.min = halves_of(tensors[3], dims, "min");
    TORCH_CHECK(tensors[3]->sizes() == tensors[2]->sizes(), "min must have scale's shape");
  }
  return w;
}

constexpr int64_t kInlineMacs = 1 << 18;

int64_t rows_per_job(int64_t total_rows) {
  const int64_t threads = at::get_num_threads();
  const int64_t target = (total_rows + 8 * threads - 1) / (8 * threads);  // about 8 jobs per thread
  // at most 256: long runs of consecutive rows per thread keep the hardware prefetchers streaming (measured, K = 1024)
  return std::min<int64_t>(256, std::max<int64_t>(8, (target + 7) / 8 * 8));
}

void run_jobs(const std::vector<GemmJob>& jobs, const QuantActivations& act) {
  const Isa isa = active_isa();
  int64_t max_k = 0, macs = 0;
  for (const GemmJob& job : jobs) {
    max_k = std::max<int64_t>(max_k, job.w.k);
    macs += (job.n1 - job.n0) * job.w.k * job.m;
  }
  std::atomic<int64_t> next{0};
  const int64_t count = static_cast<int64_t>(jobs.size());
  // a few microseconds of work runs on the calling thread: waking the pool would cost as much
  const int64_t threads = macs < kInlineMacs ? 1 : std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(2 * 8 * (max_k / 16) + 16);  // ds [2][8][K/16] of dot_rows
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) run_job(jobs[i], act, isa, scratch.data());
  });
}

std::vector<at::Tensor> qlinear_shared_input(const at::Tensor& x,
                                             const std::vector<std::vector<c10::optional<at::Tensor>>>& weights,
                                             const std::vector<std::vector<int64_t>>& formats) {
  TORCH_CHECK(weights.size() == formats.size(), "one format per weight");
  if (x.scalar_type() == at::kBFloat16 && prefers_bf16_gemm(x.size(0))) {
    const at::Tensor xb = x.contiguous();
    std::vector<at::Tensor> outputs;
    for (size_t i = 0; i < weights.size(); ++i) {
      const QuantWeight w = make_weight(weights[i], formats[i], 2);
      TORCH_CHECK(w.k == x.size(1), "x has ", x.size(1), " columns but the weight has K = ", w.k);
      outputs.push_back(at::linear(xb, dequantize_bf16(w)).to(at::kFloat));
    }
    return outputs;
  }
  const QuantActivations act = quantize_activations(x);
  std::vector<at::Tensor> outputs;
  std::vector<GemmJob> jobs;
  for (size_t i = 0; i < weights.size(); ++i) {
    const QuantWeight w = make_weight(weights[i], formats[i], 2);
    TORCH_CHECK(w.k == act.k, "x has ", act.k, " columns but the weight has K = ", w.k);
    outputs.push_back(at::empty({act.m, w.n}, at::TensorOptions().dtype(at::kFloat)));
    const int64_t step = rows_per_job(w.n);
    for (int64_t n0 = 0; n0 < w.n; n0 += step) {
      GemmJob job;
      job.w = w;
      job.n0 = n0;
      job.n1 = std::min(w.n, n0 + step);
      job.m = act.m;
      job.out = outputs.back().data_ptr<float>();
      job.ldo = w.n;
      jobs.push_back(job);
    }
  }
  if (act.m > 0) run_jobs(jobs, act);
  return outputs;
}

at::Tensor qlinear(const at::Tensor& x, const std::vector<c10::optional<at::Tensor>>& weight,
                   const std::vector<int64_t>& format) {
  return qlinear_shared_input(x, {weight}, {format})[0];
}

}  // namespace dots_cpu

// Python bindings of the CPU quantized kernels (wrapped by qlinear.py and qmoe.py).
#include <torch/extension.h>

#include "dequantize.h"
#include "quant_types.h"

namespace dots_cpu {
at::Tensor qlinear(const at::Tensor& x, const std::vector<c10::optional<at::Tensor>>& weight,
                   const std::vector<int64_t>& format);
std::vector<at::Tensor> qlinear_shared_input(const at::Tensor& x,
                                             const std::vector<std::vector<c10::optional<at::Tensor>>>& weights,
                                             const std::vector<std::vector<int64_t>>& formats);
at::Tensor qmoe(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                const std::vector<std::vector<c10::optional<at::Tensor>>>& experts,
                const std::vector<std::vector<int64_t>>& formats, int64_t expert_start);
}  // namespace dots_cpu

namespace {
const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

std::string isa_name(dots_cpu::Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

void set_isa_by_name(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return dots_cpu::set_isa(static_cast<dots_cpu::Isa>(i));
  TORCH_CHECK(false, "unknown instruction set '", name, "' (scalar, avx2 or avx512)");
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &dots_cpu::qlinear, "x [M, K] @ packed w [N, K]^T -> float32 [M, N]");
  m.def("qlinear_shared_input", &dots_cpu::qlinear_shared_input, "one x, several packed weights");
  m.def("qmoe", &dots_cpu::qmoe, "routed experts of one MoE layer over packed gate/up/down stacks");
  m.def("dequantize_bf16", [](const std::vector<c10::optional<at::Tensor>>& weight,
                              const std::vector<int64_t>& format) {
    return dots_cpu::dequantize_bf16(dots_cpu::make_weight(weight, format, 2));
  }, "packed [N, K] -> bfloat16 [N, K]");
  m.def("prefers_bf16_gemm", &dots_cpu::prefers_bf16_gemm, "whether qlinear multiplies this many rows in bfloat16");
  m.def("best_isa", [] { return isa_name(dots_cpu::best_isa()); });
  m.def("active_isa", [] { return isa_name(dots_cpu::active_isa()); });
  m.def("set_isa", &set_isa_by_name, "scalar, avx2 or avx512 (capped at what the CPU runs)");
}

// qmoe: the routed experts of one MoE layer over packed weights.
//   x [T, H] float32/bfloat16, expert_ids int64 [T, k] (global ids), weights float32 [T, k],
//   gate/up stacks [E_local, I, H], down stack [E_local, H, I], each in its own packed format
//   -> out float32 [T, H] = sum_j weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t]),
//   e = expert_ids[t, j] - expert_start; pairs whose e is outside [0, E_local) add nothing.
// x is quantized once; pairs are grouped by expert so each expert's weights are read once for all its tokens (experts
// without pairs are never touched); stage 1 runs (expert, gate or up, row tile) jobs, the intermediate silu(g) * u is
// quantized once per pair, stage 2 runs (expert, row tile) jobs of down, and each token sums its pairs in order.
// With a bfloat16 x, an expert with kDequantizeMinRows pairs or more runs in bfloat16 through oneDNN instead.
#include <ATen/Parallel.h>

#include <cmath>

#include "dequantize.h"
#include "quant_types.h"
#include "quantize_activations.h"

namespace dots_cpu {
namespace {

struct Routing {
  std::vector<int64_t> offsets;  // [E_local + 1]: expert e's pairs are sorted positions offsets[e] .. offsets[e+1]
  std::vector<int32_t> tokens;   // [P] token of each sorted pair
  std::vector<int64_t> position; // [T * k] sorted position of each pair, -1 when not local
  std::vector<int32_t> iota;     // [P] 0 .. P-1
};

Routing group_by_expert(const at::Tensor& expert_ids, int64_t num_experts, int64_t expert_start) {
  const int64_t pairs = expert_ids.numel(), k = expert_ids.size(1);
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  Routing r;
  r.offsets.assign(num_experts + 1, 0);
  r.position.assign(pairs, -1);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t e = ids[p] - expert_start;
    if (e >= 0 && e < num_experts) ++r.offsets[e + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) r.offsets[e + 1] += r.offsets[e];
  std::vector<int64_t> fill(r.offsets.begin(), r.offsets.end() - 1);
  r.tokens.resize(r.offsets.back());
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t e = ids[p] - expert_start;
    if (e < 0 || e >= num_experts) continue;
    r.position[p] = fill[e];
    r.tokens[fill[e]++] = static_cast<int32_t>(p / k);
  }
  r.iota.resize(r.offsets.back());
  for (size_t i = 0; i < r.iota.size(); ++i) r.iota[i] = static_cast<int32_t>(i);
  return r;
}

// Jobs of one stack over the int8 experts (pairs, not bf16); act_rows index the stage's activations.
void add_jobs(std::vector<GemmJob>& jobs, const QuantWeight& stack, const Routing& r, const std::vector<bool>& bf16,
              const int32_t* act_rows, float* out, int64_t rows_per) {
  for (size_t e = 0; e + 1 < r.offsets.size(); ++e) {
    const int64_t first = r.offsets[e], count = r.offsets[e + 1] - first;
    if (count == 0 || bf16[e]) continue;
    for (int64_t n0 = 0; n0 < stack.n; n0 += rows_per) {
      GemmJob job;
      job.w = stack.expert(static_cast<int64_t>(e));
      job.n0 = n0;
      job.n1 = std::min(stack.n, n0 + rows_per);
      job.m = count;
      job.act_rows = act_rows + first;
      job.out = out + first * stack.n;
      job.ldo = stack.n;
      jobs.push_back(job);
    }
  }
}

int64_t active_rows(const Routing& r, const std::vector<bool>& bf16, int64_t rows) {
  int64_t active = 0;
  for (size_t e = 0; e + 1 < r.offsets.size(); ++e) active += r.offsets[e + 1] > r.offsets[e] && !bf16[e] ? rows : 0;
  return active;
}

// An expert with many tokens: its weights dequantized to bfloat16, the tokens multiplied by oneDNN; rows of down_out.
void run_bf16_expert(const at::Tensor& x, const Routing& r, int64_t e, const QuantWeight& gate, const QuantWeight& up,
                     const QuantWeight& down, at::Tensor& down_out) {
  const int64_t first = r.offsets[e], count = r.offsets[e + 1] - first;
  const at::Tensor tokens = at::from_blob(const_cast<int32_t*>(r.tokens.data()) + first, {count}, at::kInt).to(at::kLong);
  const at::Tensor xe = x.index_select(0, tokens);  // [count, H] bfloat16
  const at::Tensor g = at::linear(xe, dequantize_bf16(gate.expert(e))).to(at::kFloat);
  const at::Tensor u = at::linear(xe, dequantize_bf16(up.expert(e))).to(at::kFloat);
  const at::Tensor h = (at::silu(g) * u).to(at::kBFloat16);
  down_out.narrow(0, first, count).copy_(at::linear(h, dequantize_bf16(down.expert(e))));
}

}  // namespace

at::Tensor qmoe(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weights,
                const std::vector<std::vector<c10::optional<at::Tensor>>>& experts,
                const std::vector<std::vector<int64_t>>& formats, int64_t expert_start) {
  TORCH_CHECK(experts.size() == 3 && formats.size() == 3, "qmoe takes the gate, up and down stacks");
  const QuantWeight gate = make_weight(experts[0], formats[0], 3);
  const QuantWeight up = make_weight(experts[1], formats[1], 3);
  const QuantWeight down = make_weight(experts[2], formats[2], 3);
  const int64_t num_experts = experts[0][0]->size(0), inter = gate.n, hidden = gate.k;
  TORCH_CHECK(up.n == inter && up.k == hidden && experts[1][0]->size(0) == num_experts, "up must match gate's shape");
  TORCH_CHECK(down.n == hidden && down.k == inter && experts[2][0]->size(0) == num_experts,
              "down must be [E, ", hidden, ", ", inter, "]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden, "x must be [T, ", hidden, "]");
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong && expert_ids.dim() == 2 && expert_ids.size(0) == x.size(0),
              "expert_ids must be int64 [T, k]");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == expert_ids.sizes(),
              "weights must be float32 [T, k]");
  const at::Tensor ids = expert_ids.contiguous();
  const at::Tensor pair_weights = weights.contiguous();
  const int64_t tokens = x.size(0), k = ids.size(1);
  at::Tensor out = at::zeros({tokens, hidden}, at::TensorOptions().dtype(at::kFloat));
  const Routing r = group_by_expert(ids, num_experts, expert_start);
  const int64_t pairs = r.offsets.back();
  if (pairs == 0) return out;

  // A bfloat16 x gives experts with many tokens to oneDNN in bfloat16 (as qlinear does), the others to the int8 jobs.
  std::vector<bool> bf16(num_experts, false);
  for (int64_t e = 0; e < num_experts; ++e)
    bf16[e] = x.scalar_type() == at::kBFloat16 && prefers_bf16_gemm(r.offsets[e + 1] - r.offsets[e]);
  const QuantActivations x_act = quantize_activations(x);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor gate_out = at::empty({pairs, inter}, f32), up_out = at::empty({pairs, inter}, f32);
  std::vector<GemmJob> jobs;
  const int64_t gate_rows = rows_per_job(2 * active_rows(r, bf16, inter));
  add_jobs(jobs, gate, r, bf16, r.tokens.data(), gate_out.data_ptr<float>(), gate_rows);
  add_jobs(jobs, up, r, bf16, r.tokens.data(), up_out.data_ptr<float>(), gate_rows);
  run_jobs(jobs, x_act);

  QuantActivations h_act = allocate_activations(pairs, inter);
  float* g = gate_out.data_ptr<float>();
  const float* u = up_out.data_ptr<float>();
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t p0 = r.offsets[e], p1 = r.offsets[e + 1];
    if (p0 == p1 || bf16[e]) continue;
    at::parallel_for(p0, p1, std::max<int64_t>(1, 16384 / inter), [&](int64_t q0, int64_t q1) {
      for (int64_t i = q0 * inter; i < q1 * inter; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
      quantize_rows(g, inter, q0, q1, h_act);
    });
  }

  at::Tensor down_out = at::empty({pairs, hidden}, f32);
  jobs.clear();
  add_jobs(jobs, down, r, bf16, r.iota.data(), down_out.data_ptr<float>(), rows_per_job(active_rows(r, bf16, hidden)));
  run_jobs(jobs, h_act);
  for (int64_t e = 0; e < num_experts; ++e)
    if (bf16[e]) run_bf16_expert(x, r, e, gate, up, down, down_out);

  const float* d = down_out.data_ptr<float>();
  const float* pw = pair_weights.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tokens, std::max<int64_t>(1, 65536 / (k * hidden)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t pos = r.position[t * k + j];
        if (pos < 0) continue;
        const float wt = pw[t * k + j];
        const float* src = d + pos * hidden;
        float* dst = o + t * hidden;
        for (int64_t c = 0; c < hidden; ++c) dst[c] += wt * src[c];
      }
    }
  });
  return out;
}

}  // namespace dots_cpu

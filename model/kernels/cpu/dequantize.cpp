// dequantize_bf16: a packed [N, K] weight -> bfloat16 [N, K] (round to nearest even), in parallel over rows.
// qlinear multiplies prefill-sized inputs (M >= kDequantizeMinRows) this way: oneDNN's bfloat16 GEMM blocks for
// registers and caches better than the int8 row kernels once each weight serves many rows.
#include "dequantize.h"

#include <ATen/Parallel.h>

#include <cstring>

namespace dots_cpu {
namespace {

// Codes of one row, 32 per chunk, into codes[K]; written so the compiler vectorizes it.
inline void unpack_row(const QuantWeight& w, const uint8_t* lo, const uint8_t* hi, uint8_t* codes) {
  if (w.bits == 8) {
    std::memcpy(codes, lo, w.k);
    return;
  }
  const int planes = w.bits - 4;
  for (int64_t c = 0; c < w.k / 32; ++c) {
    uint8_t* out = codes + 32 * c;
    for (int j = 0; j < 16; ++j) {
      out[j] = lo[16 * c + j] & 15;
      out[j + 16] = lo[16 * c + j] >> 4;
    }
    for (int p = 0; p < planes; ++p) {
      uint32_t plane;
      std::memcpy(&plane, hi + c * 4 * planes + 4 * p, 4);
      for (int j = 0; j < 32; ++j) out[j] |= ((plane >> j) & 1u) << (4 + p);
    }
  }
}

inline uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <int G>
inline void dequantize_row(const QuantWeight& w, int64_t n, uint8_t* codes, float* values, uint16_t* out) {
  unpack_row(w, w.lo + n * w.lo_row, w.hi ? w.hi + n * w.hi_row : nullptr, codes);
  const int64_t groups = w.k / G;
  const float zero = static_cast<float>(w.zero);
  for (int64_t g = 0; g < groups; ++g) {
    const float scale = static_cast<float>(w.scale[n * groups + g]);
    const float min = w.min ? static_cast<float>(w.min[n * groups + g]) : 0.f;
    for (int j = 0; j < G; ++j) values[g * G + j] = (static_cast<float>(codes[g * G + j]) - zero) * scale - min;
  }
  for (int64_t k = 0; k < w.k; ++k) out[k] = to_bf16(values[k]);
}

template <int G>
void dequantize_rows_generic(const QuantWeight& w, int64_t n0, int64_t n1, uint16_t* out) {
  std::vector<uint8_t> codes(w.k);
  std::vector<float> values(w.k);
  for (int64_t n = n0; n < n1; ++n) dequantize_row<G>(w, n, codes.data(), values.data(), out + n * w.k);
}

template <int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) void dequantize_rows_avx512(
    const QuantWeight& w, int64_t n0, int64_t n1, uint16_t* out) {
  std::vector<uint8_t> codes(w.k);
  std::vector<float> values(w.k);
  for (int64_t n = n0; n < n1; ++n) dequantize_row<G>(w, n, codes.data(), values.data(), out + n * w.k);
}

}  // namespace

at::Tensor dequantize_bf16(const QuantWeight& w) {
  at::Tensor out = at::empty({w.n, w.k}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool wide = active_isa() == Isa::avx512;
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    if (w.group == 16) {
      wide ? dequantize_rows_avx512<16>(w, n0, n1, dst) : dequantize_rows_generic<16>(w, n0, n1, dst);
    } else {
      wide ? dequantize_rows_avx512<32>(w, n0, n1, dst) : dequantize_rows_generic<32>(w, n0, n1, dst);
    }
  });
  return out;
}

bool prefers_bf16_gemm(int64_t rows) {
  static const bool has_bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
  }();
  return rows >= kDequantizeMinRows && has_bf16 && active_isa() == Isa::avx512;
}

}  // namespace dots_cpu

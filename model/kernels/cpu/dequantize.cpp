// dequantize_bf16: a packed [N, K] weight -> bfloat16 [N, K] (round to nearest even), in parallel over rows.
// qlinear multiplies prefill-sized inputs (M >= kDequantizeMinRows) this way: oneDNN's bfloat16 GEMM blocks for
// registers and caches better than the int8 row kernels once each weight serves many rows.
#include "dequantize.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>

namespace dots_cpu {
namespace {

}  // namespace

// Codes of one row, 32 per chunk, into codes[K]; written so the compiler vectorizes it.
void unpack_row(const QuantWeight& w, const uint8_t* lo, const uint8_t* hi, uint8_t* codes) {
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

namespace {

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

#define DQ_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

// 16 codes -> 16 bfloat16 values: (code - zero) * scale - min, rounded to nearest even.
DQ_TARGET inline void store_values(__m128i codes, __m512 zero, __m512 scale, __m512 min, uint16_t* out) {
  const __m512 value = _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes)), zero),
                                                   scale), min);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(value)));
}

template <int BITS, int G>
DQ_TARGET void dequantize_rows_avx512(const QuantWeight& w, int64_t n0, int64_t n1, uint16_t* dst) {
  const int64_t groups = w.k / G;
  const __m512 zero = _mm512_set1_ps(static_cast<float>(w.zero));
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* lo = w.lo + n * w.lo_row;
    const uint8_t* hi = w.hi ? w.hi + n * w.hi_row : nullptr;
    const at::Half* scale = w.scale + n * groups;
    const at::Half* min = w.min ? w.min + n * groups : nullptr;
    uint16_t* out = dst + n * w.k;
    for (int64_t c = 0; c < w.k / 32; ++c) {
      __m256i codes;
      if constexpr (BITS == 8) {
        codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 32 * c));
      } else {
        const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 16 * c)));
        codes = _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                 _mm256_set1_epi8(0x0F));
        for (int p = 0; p < BITS - 4; ++p) {
          uint32_t plane;
          std::memcpy(&plane, hi + c * 4 * (BITS - 4) + 4 * p, 4);
          codes = _mm256_mask_add_epi8(codes, plane, codes, _mm256_set1_epi8(static_cast<char>(16 << p)));
        }
      }
      for (int half = 0; half < 2; ++half) {
        const int64_t g = G == 32 ? c : 2 * c + half;
        const __m512 sv = _mm512_set1_ps(static_cast<float>(scale[g]));
        const __m512 mv = _mm512_set1_ps(min ? static_cast<float>(min[g]) : 0.f);
        const __m128i part = half ? _mm256_extracti128_si256(codes, 1) : _mm256_castsi256_si128(codes);
        store_values(part, zero, sv, mv, out + 32 * c + 16 * half);
      }
    }
  }
}

template <int G>
void dequantize_rows_wide(const QuantWeight& w, int64_t n0, int64_t n1, uint16_t* out) {
  switch (w.bits) {
    case 4: dequantize_rows_avx512<4, G>(w, n0, n1, out); break;
    case 5: dequantize_rows_avx512<5, G>(w, n0, n1, out); break;
    case 6: dequantize_rows_avx512<6, G>(w, n0, n1, out); break;
    default: dequantize_rows_avx512<8, G>(w, n0, n1, out); break;
  }
}

bool has_avx512_bf16() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return supported;
}

}  // namespace

at::Tensor dequantize_bf16(const QuantWeight& w) {
  at::Tensor out = at::empty({w.n, w.k}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const bool wide = active_isa() == Isa::avx512 && has_avx512_bf16();
  at::parallel_for(0, w.n, 16, [&](int64_t n0, int64_t n1) {
    if (w.group == 16) {
      wide ? dequantize_rows_wide<16>(w, n0, n1, dst) : dequantize_rows_generic<16>(w, n0, n1, dst);
    } else {
      wide ? dequantize_rows_wide<32>(w, n0, n1, dst) : dequantize_rows_generic<32>(w, n0, n1, dst);
    }
  });
  return out;
}

bool prefers_bf16_gemm(int64_t rows) {
  return rows >= kDequantizeMinRows && has_avx512_bf16() && active_isa() == Isa::avx512;
}

}  // namespace dots_cpu

// quantize_activations: x float32/bfloat16 [M, K] -> int8 q [M, K], per 32-block scale d (dx32 [M, K/32]), and the
// scaled block sums xs = d * sum(q) per 32 (xs32) and per 16 (dx16/xs16 [M, K/16]). Round to nearest even, both paths
// bit-identical: q = nearbyint(x * (127 / max|x|)).
#include "quantize_activations.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

namespace dots_cpu {
namespace {

constexpr int64_t kBlock = 32;

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

struct BlockOut {
  int8_t* q;
  float *dx32, *xs32, *dx16, *xs16;
};

inline void store_sums(const BlockOut& o, float d, int32_t sum0, int32_t sum1) {
  *o.dx32 = d;
  *o.xs32 = d * static_cast<float>(sum0 + sum1);
  o.dx16[0] = o.dx16[1] = d;
  o.xs16[0] = d * static_cast<float>(sum0);
  o.xs16[1] = d * static_cast<float>(sum1);
}

template <typename T>
void quantize_block_scalar(const T* x, const BlockOut& o) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(to_float(x[i])));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sums[2] = {0, 0};
  for (int i = 0; i < kBlock; ++i) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(x[i]) * inv));
    o.q[i] = static_cast<int8_t>(q);
    sums[i / 16] += q;
  }
  store_sums(o, amax / 127.f, sums[0], sums[1]);
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const at::BFloat16* x) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

__attribute__((target("avx2,fma"))) inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <typename T>
__attribute__((target("avx2,fma"))) void quantize_block_avx2(const T* x, const BlockOut& o) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float max_abs = _mm_cvtss_f32(m);
  const __m256 inv = _mm256_set1_ps(max_abs > 0.f ? 127.f / max_abs : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
  const __m256i words = _mm256_packs_epi32(q[0], q[1]);   // lanes: 0-3 4-7 | 8-11 12-15 interleaved per 128 bits
  const __m256i words2 = _mm256_packs_epi32(q[2], q[3]);
  const __m256i bytes = _mm256_packs_epi16(words, words2);
  const __m256i ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.q), ordered);
  store_sums(o, max_abs / 127.f, hsum_epi32(_mm256_add_epi32(q[0], q[1])), hsum_epi32(_mm256_add_epi32(q[2], q[3])));
}

template <typename T>
void quantize_range(const T* x, int64_t ld, int64_t row0, int64_t row1, QuantActivations& act) {
  const bool simd = active_isa() != Isa::scalar;
  const int64_t blocks = act.k / kBlock;
  int8_t* q = act.q;
  float *dx32 = act.dx32, *xs32 = act.xs32, *dx16 = act.dx16, *xs16 = act.xs16;
  for (int64_t r = row0; r < row1; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t at32 = r * blocks + b;
      const BlockOut o{q + r * act.k + b * kBlock, dx32 + at32, xs32 + at32, dx16 + 2 * at32, xs16 + 2 * at32};
      const T* src = x + r * ld + b * kBlock;
      simd ? quantize_block_avx2(src, o) : quantize_block_scalar(src, o);
    }
  }
}

}  // namespace

QuantActivations allocate_activations(int64_t m, int64_t k) {
  TORCH_CHECK(k % kBlock == 0, "K (", k, ") must be a multiple of 32");
  QuantActivations act;
  act.m = m;
  act.k = k;
  const int64_t floats = m * (k / 32) * 2 + m * (k / 16) * 2;
  act.storage = at::empty({floats * 4 + m * k}, at::TensorOptions().dtype(at::kByte));
  float* f = reinterpret_cast<float*>(act.storage.data_ptr<uint8_t>());
  act.dx32 = f;
  act.xs32 = act.dx32 + m * (k / 32);
  act.dx16 = act.xs32 + m * (k / 32);
  act.xs16 = act.dx16 + m * (k / 16);
  act.q = reinterpret_cast<int8_t*>(f + floats);
  return act;
}

void quantize_rows(const float* src, int64_t ld, int64_t row0, int64_t row1, QuantActivations& act) {
  quantize_range(src, ld, row0, row1, act);
}

QuantActivations quantize_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "activations must be [M, K] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16, got ", x.scalar_type());
  QuantActivations act = allocate_activations(x.size(0), x.size(1));
  const int64_t ld = x.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, act.k));
  at::parallel_for(0, act.m, grain, [&](int64_t r0, int64_t r1) {
    if (x.scalar_type() == at::kFloat) {
      quantize_range(x.data_ptr<float>(), ld, r0, r1, act);
    } else {
      quantize_range(x.data_ptr<at::BFloat16>(), ld, r0, r1, act);
    }
  });
  return act;
}

}  // namespace dots_cpu

// The SIMD row kernels, compiled once per instruction set: qgemm.cpp includes this file with
//   QK_NS (namespace), QK_TARGET (a target attribute string) and QK_AVX512 (1: AVX-512 VNNI, 0: AVX2) defined.
// Unpacking: one 32-weight chunk -> 32 unsigned bytes in weight order (nibbles by a per-half shift, bit planes by
// AVX-512BW byte masks or an AVX2 bit-to-byte expansion). Dot: 32 codes x 32 int8 activations -> 8 int32 lanes,
// lanes 0-3 summing weights 0..15 and lanes 4-7 weights 16..31 (dpbusd, or maddubs + madd on AVX2). AVX-512 runs
// two chunks per 512-bit dpbusd.
//
// dot_rows<BITS, G, NR, MT>: out[i][n + r] for MT activation rows and NR weight rows (a register tile):
//   sum_g scale_g * dx_g * sum_{k in g} code_k q_k  -  sum_g (zero * scale_g + min_g) * xs_g
// Shapes: weight [N, K] packed (model/quant/packed.py), activations [M, K] quantized (quantize_activations.h),
// out float32 rows; a GemmJob (quant_types.h) names the output rows n0..n1 and the activation rows.
#include <immintrin.h>

#include <cstring>

namespace QK_NS {

#define QK_INLINE __attribute__((target(QK_TARGET), always_inline)) inline
#define QK_FN __attribute__((target(QK_TARGET)))

using dots_cpu::GemmJob;
using dots_cpu::QuantActivations;
using dots_cpu::QuantWeight;

constexpr int kMaxRows = QK_AVX512 ? 8 : 4;  // activation rows per register tile
constexpr int64_t kPrefetchAhead = 3072;  // bytes of codes ahead of the decode loop (measured: 2-4 KB)
// AVX2 multiplies 8-bit codes as signed (code - 128) so maddubs cannot saturate; the correction adds 128 back.
constexpr int zero_shift(int bits) { return (!QK_AVX512 && bits == 8) ? 128 : 0; }

QK_INLINE uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

QK_INLINE __m256i add_plane(__m256i w, uint32_t plane, int p) {
  const __m256i bit = _mm256_set1_epi8(static_cast<char>(16 << p));
#if QK_AVX512
  return _mm256_mask_add_epi8(w, static_cast<__mmask32>(plane), w, bit);
#else
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(plane)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i select = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_or_si256(w, _mm256_and_si256(set, bit));
#endif
}

template <int BITS>
QK_INLINE __m256i unpack(const uint8_t* lo, const uint8_t* hi, int64_t c) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 32 * c));
  } else {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 16 * c)));
    __m256i w = _mm256_and_si256(_mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                 _mm256_set1_epi8(0x0F));
    if constexpr (BITS > 4) {
      const uint8_t* planes = hi + c * 4 * (BITS - 4);
      for (int p = 0; p < BITS - 4; ++p) w = add_plane(w, load_u32(planes + 4 * p), p);
    }
    return w;
  }
}

template <int BITS>
QK_INLINE __m256i dot32(__m256i w, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
#if QK_AVX512
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (BITS == 8) {
    const __m256i s = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(s), _mm256_sign_epi8(xv, s)), ones);
  } else {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, xv), ones);
  }
#endif
}

// The combined scale of chunk c: G = 32 one value, G = 16 lanes 0-3 and 4-7 from two.
template <int G>
QK_INLINE __m256 chunk_scale(const float* ds, int64_t c) {
  if constexpr (G == 32) {
    return _mm256_broadcast_ss(ds + c);
  } else {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ds + 2 * c)));
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
}

#if QK_AVX512
QK_INLINE uint64_t load_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// Chunks c and c + 1 as 64 bytes (128-bit lanes: c's low nibbles, c's high, c+1's low, c+1's high).
template <int BITS>
QK_INLINE __m512i unpack_pair(const uint8_t* lo, const uint8_t* hi, int64_t c) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(lo + 32 * c);
  } else {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 16 * c));
    const __m512i both = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
                                                  _mm512_castsi256_si512(bytes));
    __m512i w = _mm512_and_si512(_mm512_srlv_epi64(both, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)),
                                 _mm512_set1_epi8(0x0F));
    if constexpr (BITS == 5) {
      w = _mm512_mask_add_epi8(w, load_u64(hi + 4 * c), w, _mm512_set1_epi8(16));
    } else if constexpr (BITS == 6) {
      const uint64_t first = load_u64(hi + 8 * c), second = load_u64(hi + 8 * c + 8);
      const uint64_t plane0 = (first & 0xFFFFFFFFULL) | (second << 32);
      const uint64_t plane1 = (first >> 32) | (second & 0xFFFFFFFF00000000ULL);
      w = _mm512_mask_add_epi8(w, plane0, w, _mm512_set1_epi8(16));
      w = _mm512_mask_add_epi8(w, plane1, w, _mm512_set1_epi8(32));
    }
    return w;
  }
}

// Combined scales of chunks c and c + 1, in the lane layout of a 512-bit dpbusd over them.
template <int G>
QK_INLINE __m512 pair_scale(const float* ds, int64_t c) {
  if constexpr (G == 32) {
    const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ds + c)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(two));
  } else {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(ds + 2 * c)));
  }
}
#endif

QK_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weight rows n .. n + NR - 1 against MT activation rows; ds: scratch [NR][MT][K / G].
template <int BITS, int G, int NR, int MT>
QK_INLINE void dot_rows(const QuantWeight& w, int64_t n, const QuantActivations& act, const int32_t* rows,
                        float* const* out, float* ds) {
  const int64_t groups = w.k / G, chunks = w.k / 32;
  const uint8_t* lo[NR];
  const uint8_t* hi[NR];
  const at::Half* scale[NR];
  const at::Half* min[NR];
  for (int r = 0; r < NR; ++r) {
    lo[r] = w.lo + (n + r) * w.lo_row;
    hi[r] = w.hi ? w.hi + (n + r) * w.hi_row : nullptr;
    scale[r] = w.scale + (n + r) * groups;
    min[r] = w.min ? w.min + (n + r) * groups : nullptr;
  }
  const int8_t* xq[MT];
  const float* dx[MT];
  const float* xs[MT];
  for (int i = 0; i < MT; ++i) {
    xq[i] = act.row(rows[i]);
    dx[i] = act.dx(G, rows[i]);
    xs[i] = act.xs(G, rows[i]);
  }
  // ds[r][i][g] = scale_g * dx_g; corr[r][i] = sum_g (zero * scale_g + min_g) * xs_g
  const float zero = static_cast<float>(w.zero - zero_shift(BITS));
  __m256 corr[NR][MT];
  float corr_tail[NR][MT];
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MT; ++i) corr[r][i] = _mm256_setzero_ps(), corr_tail[r][i] = 0.f;
    float* dsr = ds + r * MT * groups;
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      const __m256 sw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale[r] + g)));
      __m256 coef = _mm256_mul_ps(sw, _mm256_set1_ps(zero));
      if (min[r])
        coef = _mm256_add_ps(coef, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(min[r] + g))));
      for (int i = 0; i < MT; ++i) {
        _mm256_storeu_ps(dsr + i * groups + g, _mm256_mul_ps(sw, _mm256_loadu_ps(dx[i] + g)));
        corr[r][i] = _mm256_fmadd_ps(coef, _mm256_loadu_ps(xs[i] + g), corr[r][i]);
      }
    }
    for (; g < groups; ++g) {
      const float sw = _cvtsh_ss(scale[r][g].x);
      const float coef = sw * zero + (min[r] ? _cvtsh_ss(min[r][g].x) : 0.f);
      for (int i = 0; i < MT; ++i) {
        dsr[i * groups + g] = sw * dx[i][g];
        corr_tail[r][i] += coef * xs[i][g];
      }
    }
  }
  __m256 tail[NR][MT];  // chunks the wide loop leaves
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MT; ++i) tail[r][i] = _mm256_setzero_ps();
#if QK_AVX512
  constexpr int U = NR * MT == 1 ? 4 : (NR * MT == 2 ? 2 : 1);  // independent accumulators per row, for latency
  __m512 acc[U][NR][MT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) acc[u][r][i] = _mm512_setzero_ps();
  int64_t c = 0;
  constexpr int64_t kStep = 2 * U * (BITS == 8 ? 32 : 16);  // code bytes per iteration
  for (; c + 2 * U <= chunks; c += 2 * U) {
    if constexpr (NR * MT == 1 && BITS < 8) {  // decode streams rows from memory: ask ahead of the prefetchers
      for (int64_t l = 0; l < kStep; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(lo[0] + c * (BITS == 8 ? 32 : 16) + kPrefetchAhead + l), _MM_HINT_T0);
    }
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      __m512i wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = unpack_pair<BITS>(lo[r], hi[r], c + 2 * u);
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        const __m512i xv = _mm512_loadu_si512(xq[i] + 32 * (c + 2 * u));
        for (int r = 0; r < NR; ++r) {
          const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv));
          acc[u][r][i] = _mm512_fmadd_ps(dot, pair_scale<G>(ds + (r * MT + i) * groups, c + 2 * u), acc[u][r][i]);
        }
      }
    }
  }
  for (; c + 2 <= chunks; c += 2) {
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = unpack_pair<BITS>(lo[r], hi[r], c);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const __m512i xv = _mm512_loadu_si512(xq[i] + 32 * c);
      for (int r = 0; r < NR; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv));
        acc[0][r][i] = _mm512_fmadd_ps(dot, pair_scale<G>(ds + (r * MT + i) * groups, c), acc[0][r][i]);
      }
    }
  }
#else
  constexpr int U = NR * MT == 1 ? 4 : (NR * MT == 2 ? 2 : 1);
  __m256 acc[U][NR][MT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < NR; ++r)
      for (int i = 0; i < MT; ++i) acc[u][r][i] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + U <= chunks; c += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      __m256i wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = unpack<BITS>(lo[r], hi[r], c + u);
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        for (int r = 0; r < NR; ++r) {
          const __m256 dot = _mm256_cvtepi32_ps(dot32<BITS>(wv[r], xq[i] + 32 * (c + u)));
          acc[u][r][i] = _mm256_fmadd_ps(dot, chunk_scale<G>(ds + (r * MT + i) * groups, c + u), acc[u][r][i]);
        }
      }
    }
  }
#endif
  for (; c < chunks; ++c) {
    for (int r = 0; r < NR; ++r) {
      const __m256i wv = unpack<BITS>(lo[r], hi[r], c);
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        const __m256 dot = _mm256_cvtepi32_ps(dot32<BITS>(wv, xq[i] + 32 * c));
        tail[r][i] = _mm256_fmadd_ps(dot, chunk_scale<G>(ds + (r * MT + i) * groups, c), tail[r][i]);
      }
    }
  }
  for (int r = 0; r < NR; ++r) {
    for (int i = 0; i < MT; ++i) {
      __m256 sum = _mm256_sub_ps(tail[r][i], corr[r][i]);
#if QK_AVX512
      __m512 wide = acc[0][r][i];
      for (int u = 1; u < U; ++u) wide = _mm512_add_ps(wide, acc[u][r][i]);
      sum = _mm256_add_ps(sum, _mm256_add_ps(_mm512_castps512_ps256(wide), _mm512_extractf32x8_ps(wide, 1)));
#else
      for (int u = 0; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][r][i]);
#endif
      out[i][n + r] = hsum(sum) - corr_tail[r][i];
    }
  }
}

template <int BITS, int G, int MT>
QK_FN void tile_rows(const GemmJob& job, const QuantActivations& act, const int32_t* rows, float* const* out,
                     float* ds) {
  constexpr int NR = MT >= 4 ? 2 : 1;  // weight rows per register tile: each activation load serves NR of them
  int64_t n = job.n0;
  for (; n + NR <= job.n1; n += NR) dot_rows<BITS, G, NR, MT>(job.w, n, act, rows, out, ds);
  for (; n < job.n1; ++n) dot_rows<BITS, G, 1, MT>(job.w, n, act, rows, out, ds);
}

// Activation rows in register tiles of kMaxRows, 4, 2, 1; every tile sweeps the job's weight rows (cached).
template <int BITS, int G>
QK_FN void run_format(const GemmJob& job, const QuantActivations& act, float* ds) {
  int32_t rows[kMaxRows];
  float* out[kMaxRows];
  for (int64_t m0 = 0; m0 < job.m;) {
    const int64_t left = job.m - m0;
    const int mt = left >= kMaxRows ? kMaxRows : left >= 4 ? 4 : left >= 2 ? 2 : 1;
    for (int i = 0; i < mt; ++i) {
      rows[i] = job.act_rows ? job.act_rows[m0 + i] : static_cast<int32_t>(m0 + i);
      out[i] = job.out + (job.out_rows ? job.out_rows[m0 + i] : m0 + i) * job.ldo;
    }
    switch (mt) {
      case 1: tile_rows<BITS, G, 1>(job, act, rows, out, ds); break;
      case 2: tile_rows<BITS, G, 2>(job, act, rows, out, ds); break;
      case 4: tile_rows<BITS, G, 4>(job, act, rows, out, ds); break;
      default: tile_rows<BITS, G, kMaxRows>(job, act, rows, out, ds); break;
    }
    m0 += mt;
  }
}

template <int G>
QK_FN void run_group(const GemmJob& job, const QuantActivations& act, float* ds) {
  switch (job.w.bits) {
    case 4: run_format<4, G>(job, act, ds); break;
    case 5: run_format<5, G>(job, act, ds); break;
    case 6: run_format<6, G>(job, act, ds); break;
    default: run_format<8, G>(job, act, ds); break;
  }
}

QK_FN void run_job(const GemmJob& job, const QuantActivations& act, float* ds) {
  job.w.group == 16 ? run_group<16>(job, act, ds) : run_group<32>(job, act, ds);
}

#undef QK_INLINE
#undef QK_FN

}  // namespace QK_NS

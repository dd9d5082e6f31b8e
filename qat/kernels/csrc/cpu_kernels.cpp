// CPU kernels of the packed ops (qat/kernels/ops.py registers them on the CPU dispatch key).
//
// Three builds of every kernel live in this one library, chosen at run time (set_isa / isa):
//   avx512   intrinsics: sign bits used directly as AVX-512 masks (one blend + add per 16 weights),
//            group scales looked up with a permute, VPOPCNTDQ for the W1A1×4 bit-serial product
//   avx2     the plain C++ of cpu_generic.inc compiled for AVX2 + FMA (gcc vectorizes it), and for
//            the decode path intrinsics (cpu_avx2.inc): 8-entry sign tables, slot lookups by permutes
//   portable the same C++ for any CPU
// Small M (decode) runs these kernels; larger M unpacks the weight to fp32 once and calls
// at::mm (the GEMM is compute-bound there, and the unpacking is O(N·K), not O(M·N·K)).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

static inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

// Run body<MT>(m0) over tokens in chunks of 8, 4, 2, 1: with MT a constant the compiler keeps every
// accumulator in a register (a runtime count spills them to the stack, and masked stores to the
// stack do not forward: measured 9x slower).
template <class F>
static inline void token_chunks(int64_t M, F&& body) {
  int64_t m0 = 0;
  for (; M - m0 >= 8; m0 += 8) body(std::integral_constant<int, 8>{}, m0);
  if (M - m0 >= 4) { body(std::integral_constant<int, 4>{}, m0); m0 += 4; }
  if (M - m0 >= 2) { body(std::integral_constant<int, 2>{}, m0); m0 += 2; }
  if (M - m0 >= 1) body(std::integral_constant<int, 1>{}, m0);
}

namespace portable {
#include "cpu_generic.inc"
}  // namespace portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt,f16c")
namespace avx2 {
#include "cpu_generic.inc"
#include "cpu_avx2.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,fma,popcnt")
namespace avx512 {

static inline __m512 signed_x(__mmask16 k, __m512 v) {  // +v where the sign bit is 1, else −v
  return _mm512_mask_blend_ps(k, _mm512_sub_ps(_mm512_setzero_ps(), v), v);
}

static void binary_rows(const float* x, int64_t M, int64_t Kp, const uint32_t* signs, int64_t W,
                        const float* scales, int64_t G, int64_t n0, int64_t n1, float* y, int64_t N) {
  const int64_t gh = Kp / G / 16;  // 16-column halves per scale group (caller: integral)
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(signs + n * W);  // little endian: half h = columns 16h..
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * Kp;
      __m512 total = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;  // four chains hide the add latency
        int64_t h = g * gh;
        const int64_t e = h + gh;
        for (; h + 4 <= e; h += 4) {
          a0 = _mm512_add_ps(a0, signed_x(s[h], _mm512_loadu_ps(xm + 16 * h)));
          a1 = _mm512_add_ps(a1, signed_x(s[h + 1], _mm512_loadu_ps(xm + 16 * h + 16)));
          a2 = _mm512_add_ps(a2, signed_x(s[h + 2], _mm512_loadu_ps(xm + 16 * h + 32)));
          a3 = _mm512_add_ps(a3, signed_x(s[h + 3], _mm512_loadu_ps(xm + 16 * h + 48)));
        }
        for (; h < e; ++h) a0 = _mm512_add_ps(a0, signed_x(s[h], _mm512_loadu_ps(xm + 16 * h)));
        const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        total = _mm512_fmadd_ps(acc, _mm512_set1_ps(scales[n * G + g]), total);
      }
      y[m * N + n] = _mm512_reduce_add_ps(total);
    }
  }
}

// Lookup tables over 4 sign bits (T-MAC's idea): for token m and each 4 columns, the 16 values
// ±x0 ±x1 ±x2 ±x3 (table[e], bit j of e = the sign of column j) fill one zmm register; 16 rows'
// nibbles are indices into it (one permute = 16 rows × 4 columns). tables [M, Kp/4, 16].
static void build_tables(const float* x, int64_t M, int64_t Kp, float* tables) {
  alignas(64) float pat[4][16];
  for (int j = 0; j < 4; ++j)
    for (int e = 0; e < 16; ++e) pat[j][e] = ((e >> j) & 1) ? 1.f : -1.f;
  const __m512 p0 = _mm512_load_ps(pat[0]), p1 = _mm512_load_ps(pat[1]), p2 = _mm512_load_ps(pat[2]),
               p3 = _mm512_load_ps(pat[3]);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t q = 0; q < Kp / 4; ++q) {
      const float* v = x + m * Kp + 4 * q;
      __m512 t = _mm512_mul_ps(_mm512_set1_ps(v[0]), p0);
      t = _mm512_fmadd_ps(_mm512_set1_ps(v[1]), p1, t);
      t = _mm512_fmadd_ps(_mm512_set1_ps(v[2]), p2, t);
      t = _mm512_fmadd_ps(_mm512_set1_ps(v[3]), p3, t);
      _mm512_store_ps(tables + (m * (Kp / 4) + q) * 16, t);
    }
}

// Rows [n0, n1) in blocks of 16 lanes; scale groups of whole words (wpg words each). The 16 rows'
// word w: gathered from the row-major signs, or (Blocked) one load from the blocked copy
// [blocks, W, 16] the layer derives on the CPU (reference.blocked_signs): same offsets per block.
template <bool Blocked>
static void binary_rows_lut(const float* tables, int64_t M, int64_t W, const uint32_t* signs, const float* scales,
                            int64_t G, int64_t wpg, int64_t n0, int64_t n1, float* y, int64_t N) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i fifteen = _mm512_set1_epi32(15);
  prefetch_lines(signs + n0 * W, std::min<int64_t>(32, n1 - n0) * W * 4);  // the first two blocks at once
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - nb);
    const __mmask16 k = (__mmask16)(rows == 16 ? 0xFFFF : (1u << rows) - 1u);
    const __m512i offs = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)W));  // word 0 of each row
    const int* base = reinterpret_cast<const int*>(signs + nb * W);  // block nb / 16, either layout
    // the rows two blocks ahead, fetched now: a gather meets 16 cold cache lines at once, and the
    // hardware prefetchers miss this pattern (decode streams every layer from DRAM: measured 2.5-4x
    // slower than the same call in cache)
    if (nb + 32 < n1) prefetch_lines(signs + (nb + 32) * W, 16 * W * 4);
    for (int64_t m = 0; m < M; ++m) {
      const float* T = tables + m * (W * 8) * 16;
      __m512 total = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
        for (int64_t w = g * wpg; w < (g + 1) * wpg; ++w) {
          __m512i v;
          if constexpr (Blocked) v = _mm512_loadu_si512(base + 16 * w);  // padding rows: masked at the store
          else v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, _mm512_add_epi32(offs, _mm512_set1_epi32((int)w)), base, 4);
          const float* t = T + w * 8 * 16;
          a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_and_si512(v, fifteen), _mm512_load_ps(t)));
          a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 4), fifteen), _mm512_load_ps(t + 16)));
          a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8), fifteen), _mm512_load_ps(t + 32)));
          a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 12), fifteen), _mm512_load_ps(t + 48)));
          a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 16), fifteen), _mm512_load_ps(t + 64)));
          a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 20), fifteen), _mm512_load_ps(t + 80)));
          a0 = _mm512_add_ps(a0, _mm512_permutexvar_ps(_mm512_and_si512(_mm512_srli_epi32(v, 24), fifteen), _mm512_load_ps(t + 96)));
          a1 = _mm512_add_ps(a1, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), _mm512_load_ps(t + 112)));
        }
        const __m512 sc = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k,
                                                   _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32((int)G)),
                                                                    _mm512_set1_epi32((int)g)),
                                                   scales + nb * G, 4);
        total = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), sc, total);
      }
      _mm512_mask_storeu_ps(y + m * N + nb, k, total);  // lanes are rows: y[m, nb..nb+15] contiguous
    }
  }
}

// G <= 16 scales per row (or per matrix): the id of 16 weights is assembled from the planes'
// masks, the scales looked up with one permute; the decoded weights serve every token.
static void grouped_rows(const float* x, int64_t M, int64_t Kp, const uint32_t* signs,
                         const uint32_t* planes, int64_t B, int64_t W, const float* scales, int64_t G,
                         bool per_row, int64_t n0, int64_t n1, float* y, int64_t N, float* /*wrow*/) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(signs + n * W);
    const __m512 alpha = _mm512_maskz_loadu_ps((__mmask16)((1u << G) - 1u), scales + (per_row ? n * G : 0));
    token_chunks(M, [&](auto MTc, int64_t m0) {
      constexpr int mt = decltype(MTc)::value;
      __m512 acc[mt][2];
      for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      auto decode = [&](int64_t h) {  // the 16 weights of half h
        __m512i ids = _mm512_setzero_si512();
        for (int64_t b = 0; b < B; ++b) {
          const __mmask16 kb = reinterpret_cast<const uint16_t*>(planes + (b * N + n) * W)[h];
          ids = _mm512_mask_add_epi32(ids, kb, ids, _mm512_set1_epi32(1 << b));
        }
        const __m512 a = _mm512_permutexvar_ps(ids, alpha);
        return _mm512_mask_blend_ps(s[h], _mm512_sub_ps(_mm512_setzero_ps(), a), a);
      };
      for (int64_t h = 0; h < Kp / 16; h += 2) {  // Kp is a multiple of 32: halves come in pairs
        const __m512 w0 = decode(h), w1 = decode(h + 1);
        for (int i = 0; i < mt; ++i) {
          const float* xm = x + (m0 + i) * Kp + 16 * h;
          acc[i][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[i][0]);
          acc[i][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[i][1]);
        }
      }
      for (int i = 0; i < mt; ++i) y[(m0 + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
    });
  }
}

// int8 rows, or int4 nibbles with x given deinterleaved per 32 columns (even columns, then odd).
static void int_rows(const float* x, int64_t M, int64_t K, const int8_t* c8, const uint8_t* c4,
                     const float* scale, int64_t n0, int64_t n1, float* y, int64_t N) {
  const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  for (int64_t n = n0; n < n1; ++n) {
    token_chunks(M, [&](auto MTc, int64_t m0) {
      constexpr int mt = decltype(MTc)::value;
      __m512 acc[mt][2];
      for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
      if (c8) {
        const int8_t* r = c8 + n * K;
        for (int64_t j = 0; j < K; j += 16) {
          const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j))));
          for (int i = 0; i < mt; ++i)  // K is a multiple of 16, not always of 32: one chain per token
            acc[i][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (m0 + i) * K + j), acc[i][0]);
        }
      } else {
        const uint8_t* r = c4 + n * (K / 2);
        for (int64_t j = 0; j < K; j += 32) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + j / 2)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low), eight));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
          for (int i = 0; i < mt; ++i) {
            const float* xm = x + (m0 + i) * K + j;
            acc[i][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), acc[i][1]);
          }
        }
      }
      for (int i = 0; i < mt; ++i)
        y[(m0 + i) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) * scale[n];
    });
  }
}

// A binary row as fp32 when each scale group is whole 16-column halves: one blend per 16 weights.
static void unpack_signs_halves(const uint32_t* signs, const float* alpha, int64_t G, int64_t gcols, float* r) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(signs);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 v = _mm512_set1_ps(alpha[g]), nv = _mm512_set1_ps(-alpha[g]);
    for (int64_t h = g * gcols / 16; h < (g + 1) * gcols / 16; ++h) _mm512_storeu_ps(r + 16 * h, _mm512_mask_blend_ps(s[h], nv, v));
  }
}

// An int8 row times its scale as fp32 (the head's larger-M path: 28 M codes a prefill on the default)
static void unpack_int8_row(const int8_t* c, float scale, int64_t K, float* r) {
  const __m512 s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= K; j += 16)
    _mm512_storeu_ps(r + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)))), s));
  for (; j < K; ++j) r[j] = (float)c[j] * scale;
}

using avx2::hsum;

static inline __m256i widen8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
static inline __m256i widen8(const uint16_t* p) { return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// PB-LLM's salient correction from a CSR column list, for rows with one alpha:
// y[m, n] += Σ_i (code_i·s − (z·s + alpha))·x[m, col_i]  (= ((code − z)·s − alpha)·x, one fmsub per
// 8 entries). 16 entries a step in two 8-lane halves, their columns and codes read contiguously, x
// gathered: on Zen 4 a 16-lane gather, or 8-lane gathers put together into 16 lanes, ran 2x slower
// than 8-lane gathers into 8-lane sums (measured 4.4 / 3.5 vs 1.7 ms for 4.5 M entries, one thread).
// The values serve every token of the chunk; the last cnt % 16 entries are summed one by one.
template <class Code>
static void salient_rows(const int32_t* row_ptr, const uint16_t* cols, const Code* codes, const float* sal_scale,
                         const float* sal_zero, const float* alpha, const float* x, int64_t M, int64_t Kp, int64_t n0,
                         int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t i0 = row_ptr[n], cnt = row_ptr[n + 1] - i0;
    if (cnt == 0) continue;
    const float s = sal_scale[n], o = sal_zero[n] * sal_scale[n] + alpha[n];
    const __m256 vs = _mm256_set1_ps(s), vo = _mm256_set1_ps(o);
    const uint16_t* col = cols + i0;
    const Code* code = codes + i0;
    token_chunks(M, [&](auto MTc, int64_t m0) {
      constexpr int mt = decltype(MTc)::value;
      __m256 acc[mt][2];
      for (int t = 0; t < mt; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= cnt; i += 16) {
        const __m256 v0 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(widen8(code + i)), vs, vo);
        const __m256 v1 = _mm256_fmsub_ps(_mm256_cvtepi32_ps(widen8(code + i + 8)), vs, vo);
        const __m256i j0 = widen8(col + i), j1 = widen8(col + i + 8);
        for (int t = 0; t < mt; ++t) {
          const float* xm = x + (m0 + t) * Kp;
          acc[t][0] = _mm256_fmadd_ps(v0, _mm256_i32gather_ps(xm, j0, 4), acc[t][0]);
          acc[t][1] = _mm256_fmadd_ps(v1, _mm256_i32gather_ps(xm, j1, 4), acc[t][1]);
        }
      }
      for (int t = 0; t < mt; ++t) {
        const float* xm = x + (m0 + t) * Kp;
        float tail = 0.f;
        for (int64_t j = i; j < cnt; ++j) tail += ((float)code[j] * s - o) * xm[col[j]];
        y[(m0 + t) * N + n] += hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + tail;
      }
    });
  }
}

// The same from the bitmap, for layers with no derived column list (PartialBinary.derived lists a
// bitmap's columns on the CPU when uint16 can address them): per 16 columns, the x values the mask
// selects are compressed to the low lanes (register form: fast on every AVX-512 CPU), where they
// meet the row's next popcount(mask) codes, read contiguously.
static void salient_rows_bitmap(const int32_t* row_ptr, const uint32_t* bitmap, const uint8_t* codes8,
                                const uint16_t* codes16, const float* sal_scale, const float* sal_zero,
                                const float* alpha, const float* x, int64_t M, int64_t Kp, int64_t W, int64_t n0,
                                int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    if (row_ptr[n + 1] == row_ptr[n]) continue;
    const uint16_t* bm = reinterpret_cast<const uint16_t*>(bitmap + n * W);
    const __m512 vs = _mm512_set1_ps(sal_scale[n]), vz = _mm512_set1_ps(sal_zero[n]), va = _mm512_set1_ps(alpha[n]);
    token_chunks(M, [&](auto MTc, int64_t m0) {
      constexpr int mt = decltype(MTc)::value;
      __m512 acc[mt][2];  // two chains: the fma latency, not its throughput, would bound one
      for (int t = 0; t < mt; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
      int64_t i = row_ptr[n];
      auto values = [&](__mmask16 first) {  // the next salient values (low lanes), minus alpha
        const __m512i c = codes8 ? _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(first, codes8 + i))
                                 : _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first, codes16 + i));
        return _mm512_sub_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(c), vz), vs), va);
      };
      for (int64_t h = 0; h < 2 * W; h += 2) {  // 2·W halves: always an even count
        const __mmask16 k0 = bm[h], k1 = bm[h + 1];
        const int c0 = __builtin_popcount(k0), c1 = __builtin_popcount(k1);
        const __mmask16 f0 = (__mmask16)((1u << c0) - 1u), f1 = (__mmask16)((1u << c1) - 1u);
        const __m512 v0 = values(f0);
        i += c0;
        const __m512 v1 = values(f1);
        i += c1;
        for (int t = 0; t < mt; ++t) {
          const float* xm = x + (m0 + t) * Kp + 16 * h;
          acc[t][0] = _mm512_mask3_fmadd_ps(v0, _mm512_maskz_compress_ps(k0, _mm512_loadu_ps(xm)), acc[t][0], f0);
          acc[t][1] = _mm512_mask3_fmadd_ps(v1, _mm512_maskz_compress_ps(k1, _mm512_loadu_ps(xm + 16)), acc[t][1], f1);
        }
      }
      for (int t = 0; t < mt; ++t) y[(m0 + t) * N + n] += _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    });
  }
}

// PB-LLM's salient correction from the slot layout (derived on the CPU: reference.salient_slots):
// rows in blocks of 16, one per lane; columns in chunks of 32, the chunk's 32 x values held in two
// registers. A slot holds, per lane, that row's next salient entry in the chunk (its column in the
// chunk and its code) or padding (column 0xFF): one permute looks up 16 entries' x, no gather (the
// 8-lane gathers of the list kernel cost ~1.6 cycles an entry on Zen 4). Padding fills ~55 % of the
// lanes on the embedded default: the rows of a block have different counts per chunk.
template <class Code>
static inline __m512 slot_codes(const Code* c) {
  if constexpr (sizeof(Code) == 1) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  else return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c))));
}

template <class Code>
static void salient_slots(const int32_t* slot_ptr, const uint8_t* cols, const Code* codes, const float* sal_scale,
                          const float* sal_zero, const float* alpha, const float* x, int64_t M, int64_t Kp,
                          int64_t W, int64_t n0, int64_t n1, float* y, int64_t N) {
  const __m512i width = _mm512_set1_epi32(32);
  const int64_t b0 = n0 / 16, b1 = (n1 + 15) / 16;  // n0: a multiple of 16
  auto prefetch_slots = [&](int64_t from, int64_t to) {  // the slots of blocks [from, to)
    const int64_t a = slot_ptr[from * W], e = slot_ptr[to * W];
    prefetch_lines(cols + 16 * a, 16 * (e - a));
    prefetch_lines(codes + 16 * a, 16 * (e - a) * (int64_t)sizeof(Code));
  };
  prefetch_lines(slot_ptr + b0 * W, std::min<int64_t>(4, b1 - b0) * W * 4);
  prefetch_slots(b0, std::min(b0 + 2, b1));
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t rows = std::min<int64_t>(16, n1 - nb);
    const __mmask16 k = (__mmask16)(rows == 16 ? 0xFFFF : (1u << rows) - 1u);
    const __m512 vs = _mm512_maskz_loadu_ps(k, sal_scale + nb);  // value = code·s − (z·s + alpha)
    const __m512 vo = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, sal_zero + nb), vs, _mm512_maskz_loadu_ps(k, alpha + nb));
    const int32_t* ptr = slot_ptr + (nb / 16) * W;
    const int64_t b = nb / 16;  // two blocks ahead, as binary_rows_lut (their offsets four ahead)
    if (b + 4 < b1) prefetch_lines(slot_ptr + (b + 4) * W, W * 4);
    if (b + 2 < b1) prefetch_slots(b + 2, b + 3);
    token_chunks(M, [&](auto MTc, int64_t m0) {
      constexpr int mt = decltype(MTc)::value;
      __m512 acc[mt][2];  // two chains: the fma latency would bound one
      for (int t = 0; t < mt; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
      for (int64_t c = 0; c < W; ++c) {
        int64_t s = ptr[c];
        const int64_t e = ptr[c + 1];
        if (s == e) continue;
        __m512 lo[mt], hi[mt];
        for (int t = 0; t < mt; ++t) {
          lo[t] = _mm512_loadu_ps(x + (m0 + t) * Kp + 32 * c);
          hi[t] = _mm512_loadu_ps(x + (m0 + t) * Kp + 32 * c + 16);
        }
        auto step = [&](int64_t slot, int chain) {
          const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + 16 * slot)));
          const __mmask16 valid = _mm512_cmplt_epu32_mask(idx, width);
          const __m512 v = _mm512_fmsub_ps(slot_codes(codes + 16 * slot), vs, vo);
          for (int t = 0; t < mt; ++t)
            acc[t][chain] = _mm512_mask3_fmadd_ps(v, _mm512_permutex2var_ps(lo[t], idx, hi[t]), acc[t][chain], valid);
        };
        for (; s + 2 <= e; s += 2) { step(s, 0); step(s + 1, 1); }
        if (s < e) step(s, 0);
      }
      for (int t = 0; t < mt; ++t) {  // lanes are rows: y[m, nb..nb+15] contiguous
        float* yr = y + (m0 + t) * N + nb;
        _mm512_mask_storeu_ps(yr, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, yr), _mm512_add_ps(acc[t][0], acc[t][1])));
      }
    });
  }
}

// The larger-M path's unpacked rows of one block (nb, rows of them, K floats apart from r): each
// slot's valid lanes written as (code − z)·s at their columns, one scatter per slot (a branch per
// lane on the padding mispredicts about half the time).
template <class Code>
static void scatter_slots(const int32_t* slot_ptr, const uint8_t* cols, const Code* codes, const float* sal_scale,
                          const float* sal_zero, int64_t W, int64_t nb, int64_t rows, int64_t K, float* r) {
  const __mmask16 k = (__mmask16)(rows == 16 ? 0xFFFF : (1u << rows) - 1u);
  const __m512 vs = _mm512_maskz_loadu_ps(k, sal_scale + nb), vz = _mm512_maskz_loadu_ps(k, sal_zero + nb);
  const __m512i row0 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)K));
  const __m512i width = _mm512_set1_epi32(32);
  const int32_t* ptr = slot_ptr + (nb / 16) * W;
  for (int64_t c = 0; c < W; ++c) {
    const __m512i base = _mm512_add_epi32(row0, _mm512_set1_epi32((int)(32 * c)));
    for (int64_t s = ptr[c]; s < ptr[c + 1]; ++s) {
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cols + 16 * s)));
      const __mmask16 valid = _mm512_mask_cmplt_epu32_mask(k, idx, width);
      const __m512 v = _mm512_mul_ps(_mm512_sub_ps(slot_codes(codes + 16 * s), vz), vs);
      _mm512_mask_i32scatter_ps(r, valid, _mm512_add_epi32(base, idx), v, 4);
    }
  }
}

static inline int64_t weighted_sum(const __m512i* acc) {  // Σ_b 2^b·Σ_lanes acc[b]
  __m512i t = acc[0];
  t = _mm512_add_epi32(t, _mm512_slli_epi32(acc[1], 1));
  t = _mm512_add_epi32(t, _mm512_slli_epi32(acc[2], 2));
  t = _mm512_add_epi32(t, _mm512_slli_epi32(acc[3], 3));
  return _mm512_reduce_add_epi32(t);
}

static void w1a1x4_rows(const uint32_t* planes, int64_t M, int64_t W, const uint32_t* signs,
                        const uint32_t* gbits, const float* scales, const float* wsum, const float* xs,
                        const float* xz, const int64_t* qsum, int64_t n0, int64_t n1, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* s = signs + n * W;
    const uint32_t* g = gbits ? gbits + n * W : nullptr;
    for (int64_t m = 0; m < M; ++m) {
      __m512i p[4], pg[4], ag[4];
      for (int b = 0; b < 4; ++b) p[b] = pg[b] = ag[b] = _mm512_setzero_si512();
      for (int64_t w = 0; w < W; w += 16) {
        const __mmask16 k = W - w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (W - w)) - 1u);
        const __m512i sv = _mm512_maskz_loadu_epi32(k, s + w);
        const __m512i gv = g ? _mm512_maskz_loadu_epi32(k, g + w) : _mm512_setzero_si512();
        const __m512i sg = _mm512_and_si512(sv, gv), sng = _mm512_andnot_si512(gv, sv);
        for (int b = 0; b < 4; ++b) {
          const __m512i q = _mm512_maskz_loadu_epi32(k, planes + (b * M + m) * W + w);
          p[b] = _mm512_add_epi32(p[b], _mm512_popcnt_epi32(_mm512_and_si512(q, sng)));
          if (g) {
            pg[b] = _mm512_add_epi32(pg[b], _mm512_popcnt_epi32(_mm512_and_si512(q, sg)));
            ag[b] = _mm512_add_epi32(ag[b], _mm512_popcnt_epi32(_mm512_and_si512(q, gv)));
          }
        }
      }
      const int64_t pos = weighted_sum(p), posg = weighted_sum(pg), allg = weighted_sum(ag);
      const float a0 = scales[2 * n], a1 = scales[2 * n + 1];
      const float dot = a0 * (float)(2 * pos - (qsum[m] - allg)) + a1 * (float)(2 * posg - allg);
      y[m * N + n] = xs[m] * (dot - xz[m] * wsum[n]);
    }
  }
}

}  // namespace avx512
#pragma GCC pop_options

namespace {

enum Isa : int64_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };

int64_t best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vpopcntdq"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt"))
    return AVX2;
  return PORTABLE;
}

int64_t g_isa = best_isa();

int64_t set_isa(int64_t isa) {  // -1: the best this CPU has; returns the one in use
  const int64_t best = best_isa();
  TORCH_CHECK(isa >= -1 && isa <= AVX512, "isa must be -1 (best), 0 (portable), 1 (avx2) or 2 (avx512), got ", isa);
  TORCH_CHECK(isa <= best, "this CPU does not support isa ", isa, " (best: ", best, ")");
  g_isa = isa < 0 ? best : isa;
  return g_isa;
}

int64_t get_isa() { return g_isa; }
int64_t cpu_best_isa() { return best_isa(); }

int64_t grain(int64_t work_per_row) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work_per_row)); }

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// x [M, K] -> fp32 [M, 32·W], zero-padded (padding sign bits are 0: −0 contributes nothing), divided
// by the layer's per-column input_scale where it has one (smoothing; empty: none)
bool given(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

torch::Tensor padded_x(const torch::Tensor& x, int64_t Kp, const torch::Tensor& input_scale = torch::Tensor()) {
  auto xf = x.to(torch::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1);
  if (!given(input_scale) && K == Kp) return xf;
  TORCH_CHECK(!given(input_scale) || input_scale.numel() == K, "input_scale must have in_features entries");
  auto out = torch::empty({M, Kp}, torch::kFloat);
  const float* xi = xf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  torch::Tensor sf = given(input_scale) ? input_scale.to(torch::kFloat).contiguous() : torch::Tensor();
  const float* s = given(input_scale) ? sf.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) o[m * Kp + k] = s ? xi[m * K + k] / s[k] : xi[m * K + k];
    for (int64_t k = K; k < Kp; ++k) o[m * Kp + k] = 0.f;
  }
  return out;
}

const uint32_t* words(const torch::Tensor& t) { return reinterpret_cast<const uint32_t*>(t.data_ptr<int32_t>()); }

// The salient part of PB-LLM's layer: w[n, c] = (code − zero[n])·scale[n] at the listed entries, whose
// sign bit is packed as +1 (so the binary part gave +alpha there). y[m, n] += (w − alpha)·x[m, c].
struct Salient {
  int64_t fmt = 0;  // 0 none, 1 CSR (uint16 columns), 2 bitmap, 3 slots (row_ptr: slot offsets per block and chunk)
  const int32_t* row_ptr = nullptr;
  const uint8_t* slot_cols = nullptr;
  const uint16_t* cols = nullptr;
  const uint32_t* bitmap = nullptr;
  const uint8_t* codes8 = nullptr;
  const uint16_t* codes16 = nullptr;
  torch::Tensor scale_t, zero_t;  // fp32 (no copy when given fp32, as PBLLM.derived hands them on the CPU)
  const float* scale = nullptr;
  const float* zero = nullptr;

  template <class F>
  void for_row_values(int64_t n, int64_t W, F f) const {  // f(value, column), codes read by width
    if (codes8) for_row(n, W, [&](int64_t i, int64_t c) { f(((float)codes8[i] - zero[n]) * scale[n], c); });
    else for_row(n, W, [&](int64_t i, int64_t c) { f(((float)codes16[i] - zero[n]) * scale[n], c); });
  }
  template <class F>
  void for_row(int64_t n, int64_t W, F f) const {  // f(value index, column)
    int64_t i = fmt == 3 ? 0 : row_ptr[n];
    if (fmt == 1) {
      for (; i < row_ptr[n + 1]; ++i) f(i, (int64_t)cols[i]);
    } else if (fmt == 3) {  // the row's lane of every slot of its block
      const int32_t* ptr = row_ptr + (n / 16) * W;
      const int64_t lane = n % 16;
      for (int64_t c = 0; c < W; ++c)
        for (int64_t s = ptr[c]; s < ptr[c + 1]; ++s)
          if (slot_cols[16 * s + lane] < 32) f(16 * s + lane, 32 * c + slot_cols[16 * s + lane]);
    } else {
      for (int64_t w = 0; w < W; ++w)
        for (uint32_t bits = bitmap[n * W + w]; bits; bits &= bits - 1) f(i++, 32 * w + __builtin_ctz(bits));
    }
  }
};

Salient salient_of(int64_t fmt, const torch::Tensor& row_ptr, const torch::Tensor& positions,
                   const torch::Tensor& codes, const torch::Tensor& sal_scale, const torch::Tensor& sal_zero) {
  Salient s;
  s.fmt = fmt;
  if (!fmt) return s;
  TORCH_CHECK(fmt >= 1 && fmt <= 3, "salient_format must be 0, 1 (CSR), 2 (bitmap) or 3 (slots), got ", fmt);
  for (auto* t : {&row_ptr, &positions, &codes}) check_cpu(*t, "salient tensor");
  s.row_ptr = row_ptr.data_ptr<int32_t>();
  if (fmt == 1) s.cols = reinterpret_cast<const uint16_t*>(positions.data_ptr<int16_t>());
  else if (fmt == 3) s.slot_cols = positions.data_ptr<uint8_t>();
  else s.bitmap = words(positions);
  if (codes.scalar_type() == torch::kUInt8) s.codes8 = codes.data_ptr<uint8_t>();
  else s.codes16 = reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>());
  s.scale_t = sal_scale.to(torch::kFloat).contiguous();
  s.zero_t = sal_zero.to(torch::kFloat).contiguous();
  s.scale = s.scale_t.data_ptr<float>();
  s.zero = s.zero_t.data_ptr<float>();
  return s;
}

// The tile buffer of the larger-M path: one per calling thread, shared by every op and kept across
// calls (a fresh multi-MB allocation is fresh pages, whose first touch cost more than unpacking).
float* tile_buffer(int64_t floats) {
  static thread_local std::vector<float> buffer;
  if ((int64_t)buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// The larger-M path: y = x·Wᵀ with W unpacked to fp32 a tile of rows at a time (no N·K buffer),
// each tile's product by at::mm into its columns of y (a strided view: y stays row-major, as the
// next layer and the model's other ops read it). unpack_rows(n0, n1, r) writes rows [n0, n1) of W
// to r, K floats apart; n0 is a multiple of 16.
template <class UnpackRows>
torch::Tensor tiled_mm(const torch::Tensor& x, int64_t N, int64_t K, UnpackRows unpack_rows) {
  auto xf = x.to(torch::kFloat).contiguous();  // [M, K]
  const int64_t M = xf.size(0);
  // tiles of up to 16 MB of fp32 (a whole layer of the embedded default): at::mm runs best on whole
  // layers (2 MB tiles cost the MLP ~30 % over fp32 F.linear in a 512-token prefill, measured);
  // whole blocks of 16 rows (the slot layout's), so that a thread unpacks whole blocks
  int64_t TB = std::min<int64_t>(N, std::max<int64_t>(16, (int64_t(1) << 22) / K));
  if (TB < N) TB = std::max<int64_t>(16, TB / 16 * 16);
  float* t = tile_buffer(TB * K);
  auto tile = torch::from_blob(t, {TB, K}, torch::kFloat);
  auto y = torch::empty({M, N}, torch::kFloat);
  for (int64_t n0 = 0; n0 < N; n0 += TB) {
    const int64_t tb = std::min(TB, N - n0);
    at::parallel_for(0, (tb + 15) / 16, std::max<int64_t>(1, grain(K) / 16), [&](int64_t b0, int64_t b1) {
      const int64_t r0 = 16 * b0, r1 = std::min(tb, 16 * b1);
      unpack_rows(n0 + r0, n0 + r1, t + r0 * K);  // rows [n0 + r0, n0 + r1), K floats apart
    });
    auto out = y.narrow(1, n0, tb);
    at::mm_out(out, xf, tile.narrow(0, 0, tb).t());
  }
  return y;
}

}  // namespace

// One binary (+ salient) layer as the small-M kernels read it.
struct BinaryLayer {
  torch::Tensor scales_f;  // fp32 (no copy when given fp32)
  const uint32_t* s = nullptr;
  const uint32_t* blocked = nullptr;  // the signs as [blocks, W, 16] (derived on the CPU), or none
  const float* a = nullptr;
  int64_t N = 0, W = 0, G = 1, K = 0;
  bool halves_ok = false;  // the kernels walk 16-column halves: each scale group whole halves of the padded row
  Salient sal;

  // the table kernels: whole words per scale group; AVX2's reads the blocked signs only
  bool lut() const { return W % G == 0 && (G == 1 || K == 32 * W) && (g_isa == AVX512 || (g_isa == AVX2 && blocked)); }
  // ...and at every M, not just decode sizes: on AVX-512 they beat unpacking to fp32 + at::mm at M = 16
  // to 512 (PB-LLM r = 0.1 at M = 512: 1.3-1.6x fp32 matmul against 0.6-1.0x); on AVX2 the salient
  // slots at M = 512 ran 0.4-0.5x fp32 (forced AVX2 on a Zen 4), so AVX2 keeps unpack + at::mm there
  bool lut_any_m() const { return lut() && g_isa == AVX512; }

  // y[m, n] for rows [n0, n1) (n0 a multiple of 16): the binary part, then the salient correction
  void rows(const float* xd, const float* tables, int64_t M, int64_t n0, int64_t n1, float* yd) const {
    const int64_t Kp = 32 * W;
    if (lut() && tables && g_isa == AVX2) avx2::binary_rows_lut(tables, M, W, blocked, a, G, W / G, n0, n1, yd, N);
    else if (lut() && tables && blocked) avx512::binary_rows_lut<true>(tables, M, W, blocked, a, G, W / G, n0, n1, yd, N);
    else if (lut() && tables) avx512::binary_rows_lut<false>(tables, M, W, s, a, G, W / G, n0, n1, yd, N);
    else if (g_isa == AVX512) avx512::binary_rows(xd, M, Kp, s, W, a, G, n0, n1, yd, N);
    else if (g_isa == AVX2) avx2::binary_rows(xd, M, Kp, s, W, a, G, n0, n1, yd, N);
    else portable::binary_rows(xd, M, Kp, s, W, a, G, n0, n1, yd, N);
    if (sal.fmt == 3 && g_isa == AVX512 && G == 1) {
      if (sal.codes8) avx512::salient_slots(sal.row_ptr, sal.slot_cols, sal.codes8, sal.scale, sal.zero, a, xd, M, Kp, W, n0, n1, yd, N);
      else avx512::salient_slots(sal.row_ptr, sal.slot_cols, sal.codes16, sal.scale, sal.zero, a, xd, M, Kp, W, n0, n1, yd, N);
    } else if (sal.fmt == 3 && g_isa == AVX2 && G == 1) {
      if (sal.codes8) avx2::salient_slots(sal.row_ptr, sal.slot_cols, sal.codes8, sal.scale, sal.zero, a, xd, M, Kp, W, n0, n1, yd, N);
      else avx2::salient_slots(sal.row_ptr, sal.slot_cols, sal.codes16, sal.scale, sal.zero, a, xd, M, Kp, W, n0, n1, yd, N);
    } else if (sal.fmt == 2 && g_isa == AVX512 && G == 1) {
      avx512::salient_rows_bitmap(sal.row_ptr, sal.bitmap, sal.codes8, sal.codes16, sal.scale, sal.zero,
                                  a, xd, M, Kp, W, n0, n1, yd, N);
    } else if (sal.fmt && g_isa == AVX512 && G == 1) {
      if (sal.codes8) avx512::salient_rows(sal.row_ptr, sal.cols, sal.codes8, sal.scale, sal.zero, a, xd, M, Kp, n0, n1, yd, N);
      else avx512::salient_rows(sal.row_ptr, sal.cols, sal.codes16, sal.scale, sal.zero, a, xd, M, Kp, n0, n1, yd, N);
    } else if (sal.fmt) {  // the binary part gave +alpha at each salient entry: add (value − alpha)·x
      const int64_t gcols = K / G;
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) {
          float corr = 0.f;
          const float* xm = xd + m * Kp;
          if (G == 1) {
            const float alpha = a[n];
            sal.for_row_values(n, W, [&](float v, int64_t c) { corr += (v - alpha) * xm[c]; });
          } else {
            sal.for_row_values(n, W, [&](float v, int64_t c) { corr += (v - a[n * G + c / gcols]) * xm[c]; });
          }
          yd[m * N + n] += corr;
        }
    }
  }
};

BinaryLayer binary_layer(const torch::Tensor& signs, const torch::Tensor& scales, int64_t K, int64_t fmt,
                         const torch::Tensor& row_ptr, const torch::Tensor& positions, const torch::Tensor& codes,
                         const torch::Tensor& sal_scale, const torch::Tensor& sal_zero) {
  check_cpu(signs, "signs");
  BinaryLayer L;
  L.N = signs.size(0), L.W = signs.size(1), L.G = scales.size(1), L.K = K;
  TORCH_CHECK(K <= 32 * L.W && K % L.G == 0, "binary_gemm: bad shapes");
  L.scales_f = scales.to(torch::kFloat).contiguous();
  L.s = words(signs);
  L.a = L.scales_f.data_ptr<float>();
  L.sal = salient_of(fmt, row_ptr, positions, codes, sal_scale, sal_zero);
  L.halves_ok = (K / L.G) % 16 == 0 && (L.G == 1 || K == 32 * L.W);
  return L;
}

// The lookup tables of x for the table kernel of the ISA in use (aligned to 64 bytes): AVX-512's
// 16 entries per 4 columns, AVX2's 8.
torch::Tensor lut_tables(const float* xd, int64_t M, int64_t Kp, float** at) {
  auto tables = torch::empty({M * Kp * (g_isa == AVX512 ? 4 : 2) + 16}, torch::kFloat);  // + 16: room to align
  *at = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(tables.data_ptr<float>()) + 63) & ~uintptr_t(63));
  if (g_isa == AVX512) avx512::build_tables(xd, M, Kp, *at);
  else avx2::build_tables(xd, M, Kp, *at);
  return tables;
}

// y [M, N] = x [M, K] · Wᵀ, W = alpha[n, g]·sign (+ PB-LLM's salient entries); fp32.
torch::Tensor binary_gemm_2d(const torch::Tensor& x, const BinaryLayer& L, const torch::Tensor& input_scale,
                             int64_t max_m_small) {
  const int64_t K = L.K;
  const int64_t M = x.size(0), N = L.N, W = L.W, G = L.G, Kp = 32 * W;
  if ((M > max_m_small && !L.lut_any_m()) || !L.halves_ok) {
    const int64_t gcols = K / G;
    const bool halves = g_isa == AVX512 && gcols % 16 == 0;
    const Salient& sal = L.sal;
    return tiled_mm(given(input_scale) ? padded_x(x, K, input_scale) : x, N, K, [&](int64_t n0, int64_t n1, float* r) {
      for (int64_t n = n0; n < n1; ++n) {
        float* rn = r + (n - n0) * K;
        if (halves) avx512::unpack_signs_halves(L.s + n * W, L.a + n * G, G, gcols, rn);
        else if (g_isa >= AVX2) avx2::unpack_signs(L.s + n * W, L.a + n * G, G, gcols, K, rn);
        else portable::unpack_signs(L.s + n * W, L.a + n * G, G, gcols, K, rn);
      }
      if (sal.fmt == 3) {  // block by block (n0: a multiple of 16); AVX-512 branch-free
        for (int64_t nb = n0; nb < n1; nb += 16) {
          float* rb = r + (nb - n0) * K;
          const int64_t rows = std::min<int64_t>(16, n1 - nb);
          if (g_isa == AVX512 && sal.codes8) avx512::scatter_slots(sal.row_ptr, sal.slot_cols, sal.codes8, sal.scale, sal.zero, W, nb, rows, K, rb);
          else if (g_isa == AVX512) avx512::scatter_slots(sal.row_ptr, sal.slot_cols, sal.codes16, sal.scale, sal.zero, W, nb, rows, K, rb);
          else if (sal.codes8) portable::scatter_slots(sal.row_ptr, sal.slot_cols, sal.codes8, sal.scale, sal.zero, W, nb, rows, K, rb);
          else portable::scatter_slots(sal.row_ptr, sal.slot_cols, sal.codes16, sal.scale, sal.zero, W, nb, rows, K, rb);
        }
      } else if (sal.fmt) {
        for (int64_t n = n0; n < n1; ++n) {
          float* rn = r + (n - n0) * K;
          sal.for_row_values(n, W, [&](float v, int64_t c) { rn[c] = v; });
        }
      }
    });
  }
  auto xp = padded_x(x, Kp, input_scale);
  auto y = torch::empty({M, N}, torch::kFloat);
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  // the table kernels a tile of tokens at a time, whose tables (16 or 8 bytes a column a token) stay
  // near 1 MB, in cache while every row reads them (no N·K fp32 weight written at large M)
  const int64_t tile = L.lut() ? std::max<int64_t>(8, (int64_t(1) << 18) / (Kp * (g_isa == AVX512 ? 4 : 2))) : M;
  // (tiles matter above max_m_small, which only lut_any_m layers reach)
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
    const int64_t mt = std::min(tile, M - m0);
    float* tables_at = nullptr;
    torch::Tensor tables = L.lut() ? lut_tables(xd + m0 * Kp, mt, Kp, &tables_at) : torch::Tensor();
    // one pass over the rows (16 at a time, the table kernel's block): the binary part, then the salient
    // correction of the same rows (one thread wake-up per call, not two: it shows at decode sizes)
    at::parallel_for(0, (N + 15) / 16, grain(Kp * mt * 16), [&](int64_t b0, int64_t b1) {
      L.rows(xd + m0 * Kp, tables_at, mt, 16 * b0, std::min(N, 16 * b1), yd + m0 * N);
    });
  }
  return y;
}

// A binary layer bound once: its tensors checked, converted and kept, the kernels' view of them
// built. PackedLinear's CPU path holds one per layer, so that a decode call converts x alone (the
// 13 arguments of binary_gemm cost microseconds of pybind a call, ×210 layers a token).
struct BoundBinaryGemm {
  std::vector<torch::Tensor> keep;  // what the layer's raw pointers read
  BinaryLayer L;
  torch::Tensor input_scale;
  int64_t max_m_small = 0;

  BoundBinaryGemm(torch::Tensor signs, torch::Tensor scales, int64_t K, int64_t fmt, torch::Tensor row_ptr,
                  torch::Tensor positions, torch::Tensor codes, torch::Tensor sal_scale, torch::Tensor sal_zero,
                  torch::Tensor input_scale_, torch::Tensor signs_blocked, int64_t max_m_small_)
      : keep{signs, row_ptr, positions, codes, signs_blocked},
        L(binary_layer(signs, scales, K, fmt, row_ptr, positions, codes, sal_scale, sal_zero)),
        input_scale(given(input_scale_) ? input_scale_.to(torch::kFloat).contiguous() : input_scale_),
        max_m_small(max_m_small_) {
    if (given(signs_blocked)) {
      check_cpu(signs_blocked, "signs_blocked");
      TORCH_CHECK(signs_blocked.numel() == (L.N + 15) / 16 * 16 * L.W, "signs_blocked must be [ceil(N/16), W, 16]");
      L.blocked = words(signs_blocked);
    }
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    const int64_t K = L.K;
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "binary_gemm: x has ", x.size(-1), " columns, the layer ", K);
    auto y = binary_gemm_2d(x.dim() == 2 ? x : x.reshape({-1, K}), L, input_scale, max_m_small);
    if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
    if (x.dim() == 2) return y;
    auto shape = x.sizes().vec();
    shape.back() = L.N;
    return y.view(shape);
  }
};

// y [..., N] = x [..., K] · Wᵀ in x's dtype (computed in fp32): the CPU kernel of qat::binary_gemm.
// input_scale (empty: none): a smoothed layer's per-column factor, x / input_scale first.
// signs_blocked (empty: none): the signs as [ceil(N/16), W, 16], read by the table kernels (AVX-512, AVX2).
torch::Tensor binary_gemm(torch::Tensor x, torch::Tensor signs, torch::Tensor scales, int64_t K,
                          int64_t fmt, torch::Tensor row_ptr, torch::Tensor positions, torch::Tensor codes,
                          torch::Tensor sal_scale, torch::Tensor sal_zero, torch::Tensor input_scale,
                          torch::Tensor signs_blocked, int64_t max_m_small) {
  return BoundBinaryGemm(signs, scales, K, fmt, row_ptr, positions, codes, sal_scale, sal_zero, input_scale,
                         signs_blocked, max_m_small)(x);
}

// Dynamic grouping: W = sign·alpha[row?, id]; planes int32 [B, N, W]; scales [1 or N, G].
torch::Tensor grouped_binary_gemm(torch::Tensor x, torch::Tensor signs, torch::Tensor planes, torch::Tensor scales,
                                  int64_t K, int64_t max_m_small) {
  check_cpu(signs, "signs");
  check_cpu(planes, "group_planes");
  const int64_t M = x.size(0), N = signs.size(0), W = signs.size(1), B = planes.size(0), G = scales.size(1);
  const bool per_row = scales.size(0) == N && N > 1;
  auto scalesf = scales.to(torch::kFloat).contiguous();
  const float* a = scalesf.data_ptr<float>();
  const uint32_t *s = words(signs), *pl = B ? words(planes) : nullptr;
  const int64_t Kp = 32 * W;
  if (M > max_m_small) {
    return tiled_mm(x, N, K, [&](int64_t n0, int64_t n1, float* rows) {
      for (int64_t n = n0; n < n1; ++n) {
        float* r = rows + (n - n0) * K;
        const float* alpha = a + (per_row ? n * G : 0);
        if (g_isa >= AVX2) avx2::unpack_grouped(s + n * W, pl ? pl + n * W : nullptr, B, N * W, alpha, K, r);
        else portable::unpack_grouped(s + n * W, pl ? pl + n * W : nullptr, B, N * W, alpha, K, r);
      }
    });
  }
  auto xp = padded_x(x, Kp);
  auto y = torch::empty({M, N}, torch::kFloat);
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, N, grain(Kp * M), [&](int64_t n0, int64_t n1) {
    std::vector<float> wrow(Kp);
    if (g_isa == AVX512 && G <= 16) avx512::grouped_rows(xd, M, Kp, s, pl, B, W, a, G, per_row, n0, n1, yd, N, wrow.data());
    else if (g_isa >= AVX2 && G <= 8) avx2::grouped_rows_vec(xd, M, Kp, s, pl, B, W, a, G, per_row, n0, n1, yd, N);
    else if (g_isa >= AVX2) avx2::grouped_rows(xd, M, Kp, s, pl, B, W, a, G, per_row, n0, n1, yd, N, wrow.data());
    else portable::grouped_rows(xd, M, Kp, s, pl, B, W, a, G, per_row, n0, n1, yd, N, wrow.data());
  });
  return y;
}

// The quantized LM head: W = codes·scale[n], int8 [N, K] or int4 nibbles [N, K/2].
torch::Tensor int_row_gemm(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, int64_t bits, int64_t K,
                           int64_t max_m_small) {
  check_cpu(codes, "codes");
  TORCH_CHECK(bits == 8 || bits == 4, "int_row_gemm: bits must be 8 or 4, got ", bits);
  const int64_t M = x.size(0), N = codes.size(0);
  auto sf = scale.to(torch::kFloat).contiguous();
  const float* sc = sf.data_ptr<float>();
  if (M > max_m_small) {
    const int8_t* c8 = bits == 8 ? codes.data_ptr<int8_t>() : nullptr;
    const uint8_t* c4 = bits == 4 ? codes.data_ptr<uint8_t>() : nullptr;
    return tiled_mm(x, N, K, [&](int64_t n0, int64_t n1, float* rows) {
      for (int64_t n = n0; n < n1; ++n) {
        float* r = rows + (n - n0) * K;
        if (c8 && g_isa == AVX512) {
          avx512::unpack_int8_row(c8 + n * K, sc[n], K, r);
        } else if (c8) {
          for (int64_t j = 0; j < K; ++j) r[j] = (float)c8[n * K + j] * sc[n];
        } else {
          for (int64_t i = 0; i < K / 2; ++i) {
            r[2 * i] = (float)((int)(c4[n * (K / 2) + i] & 15) - 8) * sc[n];
            r[2 * i + 1] = (float)((int)(c4[n * (K / 2) + i] >> 4) - 8) * sc[n];
          }
        }
      }
    });
  }
  const bool fast = g_isa >= AVX2 && (bits == 8 ? K % 16 == 0 : K % 32 == 0);
  auto xf = x.to(torch::kFloat).contiguous();
  if (fast && bits == 4)  // per 32 columns: the 16 even ones, then the 16 odd ones (the nibbles' order)
    xf = xf.view({M, K / 32, 16, 2}).transpose(-1, -2).contiguous().view({M, K});
  auto y = torch::empty({M, N}, torch::kFloat);
  const float* xd = xf.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  const int8_t* c8 = bits == 8 ? codes.data_ptr<int8_t>() : nullptr;
  const uint8_t* c4 = bits == 4 ? codes.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, N, grain(K * M), [&](int64_t n0, int64_t n1) {
    if (fast && g_isa == AVX512) avx512::int_rows(xd, M, K, c8, c4, sc, n0, n1, yd, N);
    else if (fast) avx2::int_rows_vec(xd, M, K, c8, c4, sc, n0, n1, yd, N);
    else if (g_isa == AVX2) avx2::int_rows(xd, M, K, c8, c4, sc, n0, n1, yd, N);
    else portable::int_rows(xd, M, K, c8, c4, sc, n0, n1, yd, N);
  });
  return y;
}

// W1A1×4: y[m, n] = xs[m]·(Σ_b 2^b·(ŵ_n · q_b[m]) − xz[m]·wsum[n]), ŵ = sign·alpha[n, g]; planes [4, M, W].
torch::Tensor w1a1x4_gemm(torch::Tensor planes, torch::Tensor signs, torch::Tensor gbits, torch::Tensor scales,
                          torch::Tensor wsum, torch::Tensor xs, torch::Tensor xz) {
  for (auto* t : {&planes, &signs}) check_cpu(*t, "w1a1x4 tensor");
  const int64_t M = planes.size(1), W = planes.size(2), N = signs.size(0);
  TORCH_CHECK(planes.size(0) == 4 && signs.size(1) == W && scales.size(1) == 2, "w1a1x4_gemm: bad shapes");
  auto sf = scales.to(torch::kFloat).contiguous(), ws = wsum.to(torch::kFloat).contiguous();
  auto xsf = xs.to(torch::kFloat).contiguous(), xzf = xz.to(torch::kFloat).contiguous();
  const bool grouped = gbits.numel() > 0;
  if (grouped) check_cpu(gbits, "gbits");
  // Σ_j q_j per token = Σ_b 2^b·popcount(plane_b)
  std::vector<int64_t> qsum(M, 0);
  const uint32_t* pl = words(planes);
  for (int64_t b = 0; b < 4; ++b)
    for (int64_t m = 0; m < M; ++m) {
      int64_t c = 0;
      for (int64_t w = 0; w < W; ++w) c += __builtin_popcount(pl[(b * M + m) * W + w]);
      qsum[m] += c << b;
    }
  auto y = torch::empty({M, N}, torch::kFloat);
  float* yd = y.data_ptr<float>();
  const uint32_t *s = words(signs), *g = grouped ? words(gbits) : nullptr;
  const float *a = sf.data_ptr<float>(), *wd = ws.data_ptr<float>(), *xsd = xsf.data_ptr<float>(), *xzd = xzf.data_ptr<float>();
  at::parallel_for(0, N, grain(W * M * 4), [&](int64_t n0, int64_t n1) {
    if (g_isa == AVX512) avx512::w1a1x4_rows(pl, M, W, s, g, a, wd, xsd, xzd, qsum.data(), n0, n1, yd, N);
    else if (g_isa == AVX2) avx2::w1a1x4_rows(pl, M, W, s, g, a, wd, xsd, xzd, qsum.data(), n0, n1, yd, N);
    else portable::w1a1x4_rows(pl, M, W, s, g, a, wd, xsd, xzd, qsum.data(), n0, n1, yd, N);
  });
  return y;
}

// -- The training form (QAT), not a packed op ---------------------------------------------------
// PB-LLM's fake-quantized weight: salient entries (mask) dequantized from their k-bit codes,
// (code − zero[n])·scale[n]; the rest alpha[n]·sign(w), sign(0) = +1. alpha is computed by the caller
// (the same torch reduction the packed form stores, so both agree bit for bit). One pass over the
// weight, where the pure-torch form (PartialBinary.fake_quant_reference) makes about ten. The row
// loops are cpu_generic.inc's (the AVX2 build on CPUs with AVX2, AVX-512 ones included).
torch::Tensor partial_binary_fake_quant(torch::Tensor w, torch::Tensor mask, torch::Tensor codes, torch::Tensor scale,
                                        torch::Tensor zero, torch::Tensor alpha) {
  check_cpu(w, "w");
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.dim() == 2, "partial_binary_fake_quant: w must be fp32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  auto af = alpha.to(torch::kFloat).contiguous();
  TORCH_CHECK(af.numel() == N, "partial_binary_fake_quant: alpha must have one value per row");
  const bool salient = given(mask);
  const bool byte_codes = salient && codes.scalar_type() == torch::kByte;
  torch::Tensor sf, zf;
  if (salient) {
    check_cpu(mask, "mask");
    check_cpu(codes, "codes");
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.sizes() == w.sizes() && codes.sizes() == w.sizes(),
                "partial_binary_fake_quant: mask (bool) and codes must have w's shape");
    TORCH_CHECK(byte_codes || codes.scalar_type() == torch::kInt,
                "partial_binary_fake_quant: codes must be uint8 or int32");
    sf = scale.to(torch::kFloat).contiguous();
    zf = zero.to(torch::kFloat).contiguous();
  }
  auto out = torch::empty_like(w);
  const float *wd = w.data_ptr<float>(), *ad = af.data_ptr<float>();
  const uint8_t* mb = salient ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const uint8_t* c8 = byte_codes ? codes.data_ptr<uint8_t>() : nullptr;
  const int32_t* c32 = salient && !byte_codes ? codes.data_ptr<int32_t>() : nullptr;
  const float *sd = salient ? sf.data_ptr<float>() : nullptr, *zd = salient ? zf.data_ptr<float>() : nullptr;
  float* od = out.data_ptr<float>();
  const bool vec = g_isa >= AVX2;
  using Row8 = void (*)(const float*, const uint8_t*, const uint8_t*, float, float, float, int64_t, float*);
  using Row32 = void (*)(const float*, const uint8_t*, const int32_t*, float, float, float, int64_t, float*);
  const Row8 plain = vec ? avx2::fake_quant_row<false, uint8_t> : portable::fake_quant_row<false, uint8_t>;
  const Row8 row8 = vec ? avx2::fake_quant_row<true, uint8_t> : portable::fake_quant_row<true, uint8_t>;
  const Row32 row32 = vec ? avx2::fake_quant_row<true, int32_t> : portable::fake_quant_row<true, int32_t>;
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* wr = wd + n * K;
      float* o = od + n * K;
      if (!salient) plain(wr, nullptr, nullptr, 0.f, 0.f, ad[n], K, o);
      else if (c32) row32(wr, mb + n * K, c32 + n * K, sd[n], zd[n], ad[n], K, o);
      else row8(wr, mb + n * K, c8 + n * K, sd[n], zd[n], ad[n], K, o);
    }
  });
  return out;
}

// Its straight-through gradient, given g = dL/d(fake-quant weight). For a binarized entry
// (not in mask): alpha[n]·g (0 where clip >= 0 and |w| > clip: the clipped STE), and, when alpha is
// alpha* = mean |w| over the row's binarized entries (alpha_from_w), alpha*'s own dependence on w:
// sgn(w)/count[n] · Σ_row g·sign(w) (sgn(0) = 0, as |w|'s derivative). Salient entries are frozen: 0.
// Returns (grad_w, grad_alpha = Σ_row g·sign(w) over the binarized entries: a learned alpha's gradient).
std::vector<torch::Tensor> partial_binary_ste_grad(torch::Tensor g, torch::Tensor w, torch::Tensor mask,
                                                   torch::Tensor alpha, double clip, bool alpha_from_w) {
  check_cpu(w, "w");
  auto gc = g.to(torch::kFloat).contiguous();
  TORCH_CHECK(w.scalar_type() == torch::kFloat && gc.sizes() == w.sizes(), "partial_binary_ste_grad: bad shapes");
  const int64_t N = w.size(0), K = w.size(1);
  auto af = alpha.to(torch::kFloat).contiguous();
  const bool salient = given(mask);
  if (salient) check_cpu(mask, "mask");
  auto grad_w = torch::empty_like(w);
  auto grad_alpha = torch::empty({N}, torch::kFloat);
  const float *gd = gc.data_ptr<float>(), *wd = w.data_ptr<float>(), *ad = af.data_ptr<float>();
  const uint8_t* mb = salient ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  float *gw = grad_w.data_ptr<float>(), *ga = grad_alpha.data_ptr<float>();
  const float c = (float)clip;
  const bool vec = g_isa >= AVX2, clipped = clip >= 0;
  // the four (mask, clip) forms of each build
  using RowFn = float (*)(const float*, const float*, const uint8_t*, float, float, bool, int64_t, float*);
  const RowFn forms[2][2][2] = {
      {{portable::ste_grad_row<false, false>, portable::ste_grad_row<false, true>},
       {portable::ste_grad_row<true, false>, portable::ste_grad_row<true, true>}},
      {{avx2::ste_grad_row<false, false>, avx2::ste_grad_row<false, true>},
       {avx2::ste_grad_row<true, false>, avx2::ste_grad_row<true, true>}}};
  const RowFn row = forms[vec][salient][clipped];
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      ga[n] = row(gd + n * K, wd + n * K, mb ? mb + n * K : nullptr, ad[n], c, alpha_from_w, K, gw + n * K);
  });
  return {grad_w, grad_alpha};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("binary_gemm", &binary_gemm);
  pybind11::class_<BoundBinaryGemm>(m, "BoundBinaryGemm")
      .def(pybind11::init<torch::Tensor, torch::Tensor, int64_t, int64_t, torch::Tensor, torch::Tensor, torch::Tensor,
                          torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t>())
      .def("__call__", &BoundBinaryGemm::operator());
  m.def("grouped_binary_gemm", &grouped_binary_gemm);
  m.def("int_row_gemm", &int_row_gemm);
  m.def("w1a1x4_gemm", &w1a1x4_gemm);
  m.def("partial_binary_fake_quant", &partial_binary_fake_quant);
  m.def("partial_binary_ste_grad", &partial_binary_ste_grad);
  m.def("set_isa", &set_isa);
  m.def("isa", &get_isa);
  m.def("best_isa", &cpu_best_isa);
}

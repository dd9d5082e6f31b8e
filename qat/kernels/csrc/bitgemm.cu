// Packed binary-weight kernels (the inference path of qat).
//
// Packed format (see qat/methods/pbllm.py): sign bits 32 per int32 along the input dim, bit j of
// word w is column 32w+j, 1 = +1; fp16 scales [N, G]; PB-LLM's salient part as uint8/int16 codes
// with fp16 per-row scale/zero, positions either CSR (int32 row_ptr + uint16 columns) or a
// bitmap (int32 [N, Kw]) + row_ptr. Salient positions carry sign bit +1, so the kernel adds
// (deq - alpha) * x_j on top of the dense binary product.
//
// Ops: binary_gemv   W1A16 for small M (decode), one warp per R rows, fp16 sign-flip sums
//      binary_gemv_lut W1A16 for M = 1: a lane per row, 4-column lookup tables of x in smem
//      binary_dequant dense fp16 weight for large M (prefill: dequantize, then cuBLAS)
//      w1a1x4_gemm   W1A1 bit-serial GEMM: INT4 activations as 4 bit planes, popcounts
//      grouped_gemv / grouped_dequant  dynamic grouping: sign plane + P group-id planes, the
//                    scale looked up per weight from the row's (or matrix's) G fp16 scales
#include "bitgemm.h"
#include <cuda_fp16.h>
#include <utility>


namespace {

constexpr int FMT_NONE = 0, FMT_CSR = 1, FMT_BITMAP = 2;

// Even bits -> low half, odd bits -> high half (Hacker's Delight unshuffle), so that columns
// (2p, 2p+1) land on bits (p, 16+p): one shift then lines them up with a half2's sign bits.
__device__ __forceinline__ uint32_t unzip_bits(uint32_t x) {
  uint32_t t;
  t = (x ^ (x >> 1)) & 0x22222222u; x = x ^ t ^ (t << 1);
  t = (x ^ (x >> 2)) & 0x0C0C0C0Cu; x = x ^ t ^ (t << 2);
  t = (x ^ (x >> 4)) & 0x00F000F0u; x = x ^ t ^ (t << 4);
  t = (x ^ (x >> 8)) & 0x0000FF00u; x = x ^ t ^ (t << 8);
  return x;
}

// sum_j s_j * x_j over one 32-column word; `neg` = unzip(~signs): bit set = weight is -1.
__device__ __forceinline__ float signed_sum32(uint32_t neg, const uint4 (&xv)[4]) {
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(&xv[0]);
  __half2 h0 = __float2half2_rn(0.f), h1 = __float2half2_rn(0.f);
#pragma unroll
  for (int p = 0; p < 16; ++p) {
    uint32_t flipped = xw[p] ^ ((neg << (15 - p)) & 0x80008000u);
    __half2 v = *reinterpret_cast<__half2*>(&flipped);
    if (p < 8) h0 = __hadd2(h0, v); else h1 = __hadd2(h1, v);
  }
  float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
  return (f0.x + f0.y) + (f1.x + f1.y);
}

template <typename CodeT>
__device__ __forceinline__ float salient_value(const CodeT* codes, int idx, float sc, float z) {
  float c = static_cast<float>(static_cast<uint32_t>(codes[idx]) & 0xFFFFu);
  return (c - z) * sc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int u = __shfl_up_sync(0xFFFFFFFFu, v, d);
    if (lane >= d) v += u;
  }
  return v;
}

// Calls f(code_index, column) for every salient entry of `row`, spread over the warp's lanes:
// CSR, lanes over the row's entries; bitmap, lanes over 32-column words, a warp scan giving each
// lane the index of its word's first code. All 32 lanes of the warp must call it.
template <int FMT, typename F>
__device__ __forceinline__ void for_each_salient(int row, int Kw, const int* __restrict__ row_ptr,
                                                 const uint32_t* __restrict__ bitmap,
                                                 const uint16_t* __restrict__ cols, F&& f) {
  const int lane = threadIdx.x & 31;
  if constexpr (FMT == FMT_CSR) {
    for (int e = row_ptr[row] + lane; e < row_ptr[row + 1]; e += 32) f(e, static_cast<int>(cols[e]));
  } else {
    int next = row_ptr[row];
    for (int base = 0; base < Kw; base += 32) {
      const int w = base + lane;
      uint32_t bits = w < Kw ? __ldg(bitmap + (size_t)row * Kw + w) : 0u;
      const int cnt = __popc(bits), incl = warp_inclusive_scan(cnt);
      int idx = next + incl - cnt;
      while (bits) {
        const int j = __ffs(bits) - 1;
        bits &= bits - 1;
        f(idx++, w * 32 + j);
      }
      next += __shfl_sync(0xFFFFFFFFu, incl, 31);
    }
  }
}

// R rows' sign words for chunk c (VEC consecutive words; VEC = 4 is one 16-byte load per row).
template <int R, int VEC>
__device__ __forceinline__ void load_sign_chunk(const uint32_t* __restrict__ signs, int Kw, int row0,
                                                int N, int c, bool valid, uint32_t (&dst)[R][VEC]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool live = valid && row0 + r < N;
    const uint32_t* src = signs + (size_t)(row0 + r) * Kw + (size_t)c * VEC;
    if (VEC == 4) {
      const uint4 v = live ? __ldg(reinterpret_cast<const uint4*>(src)) : make_uint4(~0u, ~0u, ~0u, ~0u);
      dst[r][0] = v.x; dst[r][VEC > 1 ? 1 : 0] = v.y; dst[r][VEC > 2 ? 2 : 0] = v.z; dst[r][VEC > 3 ? 3 : 0] = v.w;
    } else {
#pragma unroll
      for (int q = 0; q < VEC; ++q) dst[r][q] = live ? __ldg(src + q) : ~0u;
    }
  }
}

// One warp per R rows. Each lane takes a chunk of VEC consecutive sign words per step, and the
// next step's chunk is loaded before the current one is used (loads in flight during compute).
template <int M, int R, int VEC, int FMT, typename CodeT>
__global__ void __launch_bounds__(256) binary_gemv_kernel(
    const __half* __restrict__ x, int ldx, const uint32_t* __restrict__ signs, int Kw,
    const __half* __restrict__ scales, int G, int words_per_group,
    const int* __restrict__ row_ptr, const uint32_t* __restrict__ bitmap,
    const uint16_t* __restrict__ cols, const CodeT* __restrict__ codes,
    const __half* __restrict__ sal_scale, const __half* __restrict__ sal_zero,
    __half* __restrict__ y, int N) {
  const int lane = threadIdx.x & 31;
  const int row0 = ((blockIdx.x * blockDim.x + threadIdx.x) >> 5) * R;
  if (row0 >= N) return;  // whole warp leaves together
  const int nchunks = Kw / VEC;  // the host guarantees Kw % VEC == 0

  float acc[R][M], alpha_row[R];
  int sal_next[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    const bool live = row0 + r < N;
    alpha_row[r] = (G == 1 && live) ? __half2float(scales[row0 + r]) : 0.f;
    sal_next[r] = (FMT == FMT_BITMAP && live) ? row_ptr[row0 + r] : 0;
  }

  uint32_t cur[R][VEC], nxt[R][VEC];
  load_sign_chunk<R, VEC>(signs, Kw, row0, N, lane, lane < nchunks, cur);
  for (int base = 0; base < nchunks; base += 32) {
    const int c = base + lane;
    const bool valid = c < nchunks;
    load_sign_chunk<R, VEC>(signs, Kw, row0, N, c + 32, c + 32 < nchunks, nxt);
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      const int w = c * VEC + q;
      uint4 xv[M][4];
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)m * ldx + (size_t)w * 32);
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[m][i] = valid ? __ldg(src + i) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = row0 + r;
        const float alpha = G == 1 ? alpha_row[r]
            : ((valid && row < N) ? __half2float(scales[(size_t)row * G + w / words_per_group]) : 0.f);
        const uint32_t neg = unzip_bits(~cur[r][q]);
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] += alpha * signed_sum32(neg, xv[m]);
      }
    }

    if (FMT == FMT_BITMAP) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int row = row0 + r;
        const bool live = valid && row < N;
        uint32_t bw[VEC];
        int cnt = 0;
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          bw[q] = live ? __ldg(bitmap + (size_t)row * Kw + (size_t)c * VEC + q) : 0u;
          cnt += __popc(bw[q]);
        }
        const int incl = warp_inclusive_scan(cnt);  // this lane's offset into the row's values
        if (cnt) {
          const float sc = __half2float(sal_scale[row]), z = __half2float(sal_zero[row]);
          int idx = sal_next[r] + incl - cnt;
#pragma unroll
          for (int q = 0; q < VEC; ++q) {
            const int w = c * VEC + q;
            const float alpha = G == 1 ? alpha_row[r]
                : __half2float(scales[(size_t)row * G + w / words_per_group]);
            uint32_t bits = bw[q];
            while (bits) {
              const int j = __ffs(bits) - 1;
              bits &= bits - 1;
              const float d = salient_value(codes, idx++, sc, z) - alpha;
#pragma unroll
              for (int m = 0; m < M; ++m)
                acc[r][m] += d * __half2float(x[(size_t)m * ldx + (size_t)w * 32 + j]);
            }
          }
        }
        sal_next[r] += __shfl_sync(0xFFFFFFFFu, incl, 31);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int q = 0; q < VEC; ++q) cur[r][q] = nxt[r][q];
  }

  if (FMT == FMT_CSR) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int row = row0 + r;
      if (row >= N) continue;
      const float sc = __half2float(sal_scale[row]), z = __half2float(sal_zero[row]);
      for (int e = row_ptr[row] + lane; e < row_ptr[row + 1]; e += 32) {
        const int col = cols[e];
        const float alpha = __half2float(scales[(size_t)row * G + (col >> 5) / words_per_group]);
        const float d = salient_value(codes, e, sc, z) - alpha;
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] += d * __half2float(x[(size_t)m * ldx + col]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0 && row0 + r < N) y[(size_t)m * N + row0 + r] = __float2half(v);
    }
  }
}

// ---- W1A16 GEMV for M = 1 through lookup tables ------------------------------------------------
// For every 4 consecutive columns the block tabulates the 16 possible signed sums of x:
// lut[g][e] = sum_i (bit i of e ? x[4g+i] : -x[4g+i]). A sign word then costs, per 4 weights,
// one shift, one LOP3 (nibble -> byte offset), one shared load and one add (the sign-flip
// kernel's loop issues 4-6 per weight: benchmarks/sass_loops.py), with fp32 sums throughout.
// Mapping: a lane per output row, so the 32 lanes of a warp read the same table row at once;
// its 16 entries sit in 16 different banks, so any mix of nibbles is conflict-free. Each block
// has 8 warps: 8 / S row groups of 32 rows, each split S ways along K; the S partial sums of a
// row meet in shared memory at the end. K is walked in chunks of 2048 columns whose tables are
// double-buffered (build chunk c + 1 while reading chunk c: one barrier per chunk), and each
// lane's sign words for the next chunk are loaded before the current chunk is summed.
constexpr int LUT_THREADS = 256, LUT_WARPS = LUT_THREADS / 32;
constexpr int LUT_CHUNK_COLS = 2048, LUT_CHUNK_WORDS = LUT_CHUNK_COLS / 32;
constexpr int LUT_CHUNK_QUADS = LUT_CHUNK_COLS / 4, LUT_CHUNK_FLOATS = LUT_CHUNK_QUADS * 16;
constexpr int LUT_SMEM_BYTES = 2 * LUT_CHUNK_FLOATS * sizeof(float) + 64;  // two chunks, aligned
static_assert(LUT_CHUNK_QUADS % LUT_THREADS == 0, "each thread builds whole quads");

// Tables for chunk `chunk` (512 column quads x 16 entries), built by the whole block.
__device__ __forceinline__ void build_lut_chunk(const __half* __restrict__ x, int k_pad, int chunk,
                                                float* __restrict__ lut) {
#pragma unroll
  for (int i = 0; i < LUT_CHUNK_QUADS / LUT_THREADS; ++i) {
    const int g = threadIdx.x + i * LUT_THREADS;
    const int col = chunk * LUT_CHUNK_COLS + 4 * g;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (col < k_pad) {  // k_pad is a multiple of 32, so the whole quad is inside x
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(x + col));
      const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
      const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
      v[0] = lo.x; v[1] = lo.y; v[2] = hi.x; v[3] = hi.y;
    }
    // Entry e: all four signs -1, plus 2 x_i for every bit i set in e.
    const float d0 = 2.f * v[0], d1 = 2.f * v[1], d2 = 2.f * v[2], d3 = 2.f * v[3];
    const float e0 = -((v[0] + v[1]) + (v[2] + v[3]));
    const float4 lo4 = make_float4(e0, e0 + d0, e0 + d1, e0 + d0 + d1);  // entries 0-3
    float4* dst = reinterpret_cast<float4*>(lut + g * 16);
    dst[0] = lo4;
    dst[1] = make_float4(lo4.x + d2, lo4.y + d2, lo4.z + d2, lo4.w + d2);
    dst[2] = make_float4(lo4.x + d3, lo4.y + d3, lo4.z + d3, lo4.w + d3);
    dst[3] = make_float4(lo4.x + d2 + d3, lo4.y + d2 + d3, lo4.z + d2 + d3, lo4.w + d2 + d3);
  }
}

// The WPS sign words of one row starting at word w0 (zeros past the row's end; Kw % 4 == 0).
template <int WPS>
__device__ __forceinline__ void load_row_words(const uint32_t* __restrict__ row_signs, int Kw, int w0,
                                               uint32_t (&dst)[WPS]) {
#pragma unroll
  for (int u = 0; u < WPS / 4; ++u) {
    const uint4 v = w0 + 4 * u < Kw ? __ldg(reinterpret_cast<const uint4*>(row_signs + w0 + 4 * u))
                                    : make_uint4(0u, 0u, 0u, 0u);
    dst[4 * u] = v.x; dst[4 * u + 1] = v.y; dst[4 * u + 2] = v.z; dst[4 * u + 3] = v.w;
  }
}

// Byte offset of nibble J's entry inside its quad's 64-byte table: 4 * ((w >> 4J) & 15).
template <int J>
__device__ __forceinline__ uint32_t nibble_offset(uint32_t w) {
  if constexpr (J == 0) return (w << 2) & 0x3Cu;
  else return (w >> (4 * J - 2)) & 0x3Cu;
}

// ld.shared with a compile-time displacement: with `table` 64-byte aligned, the address is
// (nibble offset | table), one LOP3, and the quad's position rides in the load's immediate.
template <int DISP>
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1+%2];" : "=f"(v) : "r"(addr), "n"(DISP) : "memory");
  return v;
}

// sum_j sign_j * x_j over word Q's 32 columns: 8 table lookups, added as a tree.
template <int Q, int... J>
__device__ __forceinline__ float word_sum(uint32_t w, uint32_t table, std::integer_sequence<int, J...>) {
  const float v[8] = {lds_f32<(Q * 8 + J) * 64>(nibble_offset<J>(w) | table)...};
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// acc += sum over words Q.. of the lane's row (times the group scale when GROUPED); `table` is
// the shared address of word 0's tables. n_words (valid words of this chunk) is warp-uniform;
// FULL = all WPS words are valid (every chunk but the last), which drops the per-word test.
template <int Q, int WPS, bool GROUPED, bool FULL>
__device__ __forceinline__ void lut_dot(const uint32_t (&words)[WPS], uint32_t table, int n_words,
                                        const __half* __restrict__ row_scales, int first_word,
                                        int group_shift, float& acc) {
  if constexpr (Q < WPS) {
    if (!FULL && Q >= n_words) return;
    const float part = word_sum<Q>(words[Q], table, std::make_integer_sequence<int, 8>{});
    acc += GROUPED ? part * __half2float(row_scales[(first_word + Q) >> group_shift]) : part;
    lut_dot<Q + 1, WPS, GROUPED, FULL>(words, table, n_words, row_scales, first_word, group_shift, acc);
  }
}

// A warp's sum over one row's salient entries of (value - alpha) * x[col]: the dense binary
// product counted them as +alpha (their sign bit is +1).
template <int FMT, typename CodeT, bool GROUPED>
__device__ float salient_row_correction(int row, int Kw, const int* __restrict__ row_ptr,
                                        const uint32_t* __restrict__ bitmap,
                                        const uint16_t* __restrict__ cols,
                                        const CodeT* __restrict__ codes, float sc, float z,
                                        float alpha_row, const __half* __restrict__ row_scales,
                                        int group_shift, const __half* __restrict__ x) {
  float acc = 0.f;
  for_each_salient<FMT>(row, Kw, row_ptr, bitmap, cols, [&](int e, int col) {
    const float alpha = GROUPED ? __half2float(row_scales[(col >> 5) >> group_shift]) : alpha_row;
    acc += (salient_value(codes, e, sc, z) - alpha) * __half2float(x[col]);
  });
  return warp_sum(acc);
}

template <int S, int FMT, typename CodeT, bool GROUPED>
__global__ void __launch_bounds__(LUT_THREADS) binary_gemv_lut_kernel(
    const __half* __restrict__ x, const uint32_t* __restrict__ signs, int Kw,
    const __half* __restrict__ scales, int G, int group_shift,
    const int* __restrict__ row_ptr, const uint32_t* __restrict__ bitmap,
    const uint16_t* __restrict__ cols, const CodeT* __restrict__ codes,
    const __half* __restrict__ sal_scale, const __half* __restrict__ sal_zero,
    __half* __restrict__ y, int N) {
  static_assert(LUT_WARPS % S == 0 && (LUT_CHUNK_WORDS / S) % 4 == 0, "bad K split");
  constexpr int WPS = LUT_CHUNK_WORDS / S;        // sign words per lane per chunk
  constexpr int ROWS = 32 * (LUT_WARPS / S);      // rows per block
  // Two chunks of tables (reused at the end), 64-byte aligned by hand: lds_f32's OR needs it.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t pad = (64u - (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) & 63u)) & 63u;
  float* smem = reinterpret_cast<float*>(smem_raw + pad);  // indexing smem_raw keeps it in shared space
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int split = warp % S, local_row = (warp / S) * 32 + lane;
  const int row0 = blockIdx.x * ROWS, row = row0 + local_row;
  const uint32_t* row_signs = signs + (size_t)min(row, N - 1) * Kw;  // rows past N compute junk
  const __half* row_scales = scales + (size_t)min(row, N - 1) * G;
  const int nchunks = (Kw + LUT_CHUNK_WORDS - 1) / LUT_CHUNK_WORDS;
  const int k_pad = 32 * Kw;

  uint32_t cur[WPS], nxt[WPS];
  load_row_words<WPS>(row_signs, Kw, split * WPS, cur);
  build_lut_chunk(x, k_pad, 0, smem);
  __syncthreads();
  float acc = 0.f;
  for (int c = 0; c < nchunks; ++c) {
    const int w0 = c * LUT_CHUNK_WORDS + split * WPS;
    if (c + 1 < nchunks) {
      load_row_words<WPS>(row_signs, Kw, w0 + LUT_CHUNK_WORDS, nxt);
      build_lut_chunk(x, k_pad, c + 1, smem + ((c + 1) & 1) * LUT_CHUNK_FLOATS);
    }
    const uint32_t table = static_cast<uint32_t>(
        __cvta_generic_to_shared(smem + (c & 1) * LUT_CHUNK_FLOATS + split * WPS * 8 * 16));
    const int n_words = min(max(Kw - w0, 0), WPS);
    if (n_words == WPS) lut_dot<0, WPS, GROUPED, true>(cur, table, n_words, row_scales, w0, group_shift, acc);
    else lut_dot<0, WPS, GROUPED, false>(cur, table, n_words, row_scales, w0, group_shift, acc);
    __syncthreads();  // chunk c's tables are free for chunk c + 2
#pragma unroll
    for (int q = 0; q < WPS; ++q) cur[q] = nxt[q];
  }

  float* partial = smem;             // [S][ROWS]
  float* correction = smem + S * ROWS;  // [ROWS]
  partial[split * ROWS + local_row] = acc;
  if (FMT != FMT_NONE) {
    for (int r = warp; r < ROWS && row0 + r < N; r += LUT_WARPS) {
      const int rr = row0 + r;
      const float alpha_row = GROUPED ? 0.f : __half2float(scales[rr]);
      const float v = salient_row_correction<FMT, CodeT, GROUPED>(
          rr, Kw, row_ptr, bitmap, cols, codes, __half2float(sal_scale[rr]),
          __half2float(sal_zero[rr]), alpha_row, scales + (size_t)rr * G, group_shift, x);
      if (lane == 0) correction[r] = v;
    }
  }
  __syncthreads();
  if (threadIdx.x < ROWS && row0 + threadIdx.x < N) {
    const int t = threadIdx.x;
    float sum = 0.f;
#pragma unroll
    for (int s = 0; s < S; ++s) sum += partial[s * ROWS + t];
    float v = GROUPED ? sum : __half2float(scales[row0 + t]) * sum;
    if (FMT != FMT_NONE) v += correction[t];
    y[row0 + t] = __float2half(v);
  }
}

// One thread per 8 columns: one byte of sign bits -> one 16-byte store of 8 fp16 weights, so a
// warp writes 512 contiguous bytes.
__global__ void binary_dequant_kernel(const uint32_t* __restrict__ signs, int Kw,
                                      const __half* __restrict__ scales, int G,
                                      int words_per_group, __half* __restrict__ out, int N) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // index of an 8-column byte
  if (i >= (size_t)N * Kw * 4) return;
  const int row = i / ((size_t)Kw * 4), byte = i % ((size_t)Kw * 4), w = byte >> 2;
  const uint32_t s = (__ldg(signs + (size_t)row * Kw + w) >> ((byte & 3) * 8)) & 0xFFu;
  const __half a = scales[(size_t)row * G + w / words_per_group];
  const __half na = __hneg(a);
  __align__(16) __half vals[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) vals[j] = ((s >> j) & 1u) ? a : na;
  reinterpret_cast<uint4*>(out)[i] = *reinterpret_cast<uint4*>(vals);
}

// One warp per row: overwrite the salient positions with their k-bit values (lanes over the
// row's CSR entries, or over its bitmap words with a warp scan giving each lane its offset).
template <int FMT, typename CodeT>
__global__ void salient_scatter_kernel(const int* __restrict__ row_ptr,
                                       const uint32_t* __restrict__ bitmap,
                                       const uint16_t* __restrict__ cols, int Kw,
                                       const CodeT* __restrict__ codes,
                                       const __half* __restrict__ sal_scale,
                                       const __half* __restrict__ sal_zero,
                                       __half* __restrict__ out, int N) {
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (row >= N) return;
  const float sc = __half2float(sal_scale[row]), z = __half2float(sal_zero[row]);
  __half* dst = out + (size_t)row * Kw * 32;
  for_each_salient<FMT>(row, Kw, row_ptr, bitmap, cols, [&](int e, int col) {
    dst[col] = __float2half(salient_value(codes, e, sc, z));
  });
}

// W1A1x4: y[m,n] = xs[m] * (sum_b 2^b * sum_j w_nj q_bmj  -  xz[m] * wsum[n]),
// w_nj = s_nj * alpha_{n, g_nj}. Tile: 32 rows x 8 tokens per block, TK words staged in smem.
constexpr int TN = 32, TM = 8, TK = 32;
__global__ void w1a1x4_kernel(const uint32_t* __restrict__ planes, int M,
                              const uint32_t* __restrict__ signs,
                              const uint32_t* __restrict__ gbits, int Kw,
                              const __half* __restrict__ scales, const float* __restrict__ wsum,
                              const float* __restrict__ xs, const float* __restrict__ xz,
                              float* __restrict__ y, int N) {
  __shared__ uint32_t sS[TN][TK + 1], sG[TN][TK + 1], sQ[4][TM][TK + 1];
  const int tn = threadIdx.x, tm = threadIdx.y;  // blockDim = (32, 8)
  const int n = blockIdx.x * TN + tn, m = blockIdx.y * TM + tm;
  int c[4][2];  // per plane: sum over group 0 and group 1 of s*q in {-1,0,+1}
#pragma unroll
  for (int b = 0; b < 4; ++b) c[b][0] = c[b][1] = 0;
  const int tid = tm * TN + tn;
  for (int k0 = 0; k0 < Kw; k0 += TK) {
    for (int i = tid; i < TN * TK; i += TN * TM) {
      const int rn = i / TK, kk = i % TK, gn = blockIdx.x * TN + rn, gk = k0 + kk;
      const bool ok = gn < N && gk < Kw;
      sS[rn][kk] = ok ? signs[(size_t)gn * Kw + gk] : 0u;
      sG[rn][kk] = ok ? (gbits ? gbits[(size_t)gn * Kw + gk] : 0u) : 0u;
    }
    for (int i = tid; i < 4 * TM * TK; i += TN * TM) {
      const int b = i / (TM * TK), rm = (i / TK) % TM, kk = i % TK;
      const int gm = blockIdx.y * TM + rm, gk = k0 + kk;
      sQ[b][rm][kk] = (gm < M && gk < Kw) ? planes[((size_t)b * M + gm) * Kw + gk] : 0u;
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < TK; ++kk) {
      const uint32_t s = sS[tn][kk], g = sG[tn][kk];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const uint32_t q = sQ[b][tm][kk];
        // s*q summed: (#q with s=1) - (#q with s=0) = 2*popc(q&s) - popc(q)
        c[b][1] += 2 * __popc(q & s & g) - __popc(q & g);
        c[b][0] += 2 * __popc(q & s & ~g) - __popc(q & ~g);
      }
    }
    __syncthreads();
  }
  if (n < N && m < M) {
    const float a0 = __half2float(scales[2 * n]), a1 = __half2float(scales[2 * n + 1]);
    float acc = 0.f;
#pragma unroll
    for (int b = 0; b < 4; ++b) acc += float(1 << b) * (a0 * c[b][0] + a1 * c[b][1]);
    y[(size_t)m * N + n] = xs[m] * (acc - xz[m] * wsum[n]);
  }
}

// Dynamic grouping, small M: one warp per row, lanes over 32-column words, fp32 activations and
// sums. The row's G scales are staged in shared memory (one slice per warp); a weight's scale
// index is its P id bits. Correct for any shape; not yet tuned (x loads are strided per lane).
template <int MT>
__global__ void __launch_bounds__(256) grouped_gemv_kernel(
    const float* __restrict__ x, int M, int ldx, const uint32_t* __restrict__ signs,
    const uint32_t* __restrict__ planes, int P, int Kw, const __half* __restrict__ scales, int G,
    int scale_row_stride, float* __restrict__ y, int N) {
  extern __shared__ float s_scales[];  // [warps per block][G]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + warp;
  if (row >= N) return;  // the whole warp: rows are per warp
  float* alpha = s_scales + warp * G;
  for (int g = lane; g < G; g += 32) alpha[g] = __half2float(scales[(size_t)row * scale_row_stride + g]);
  __syncwarp();
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  const size_t plane_stride = (size_t)N * Kw, at = (size_t)row * Kw;
  for (int w = lane; w < Kw; w += 32) {
    const uint32_t s = __ldg(signs + at + w);
    uint32_t ids[8];
#pragma unroll
    for (int b = 0; b < 8; ++b) ids[b] = b < P ? __ldg(planes + b * plane_stride + at + w) : 0u;
#pragma unroll 4
    for (int j = 0; j < 32; ++j) {
      int g = 0;
#pragma unroll
      for (int b = 0; b < 8; ++b) g |= static_cast<int>((ids[b] >> j) & 1u) << b;
      const float a = alpha[g], v = ((s >> j) & 1u) ? a : -a;
      const int col = w * 32 + j;
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = fmaf(v, __ldg(x + (size_t)m * ldx + col), acc[m]);
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const float t = warp_sum(acc[m]);
    if (lane == 0 && m < M) y[(size_t)m * N + row] = t;
  }
}

// Dynamic grouping, large M: one thread per 32-column word writes its 32 fp16 weights (sign times
// an fp16 scale is exact in fp16); cuBLAS then multiplies.
__global__ void grouped_dequant_kernel(const uint32_t* __restrict__ signs,
                                       const uint32_t* __restrict__ planes, int P, int Kw,
                                       const __half* __restrict__ scales, int G,
                                       int scale_row_stride, __half* __restrict__ out, int N) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // (row, word)
  if (i >= (size_t)N * Kw) return;
  const int row = i / Kw;
  const uint32_t s = __ldg(signs + i);
  uint32_t ids[8];
#pragma unroll
  for (int b = 0; b < 8; ++b) ids[b] = b < P ? __ldg(planes + (size_t)b * N * Kw + i) : 0u;
  const __half* alpha = scales + (size_t)row * scale_row_stride;
  __half* dst = out + i * 32;
#pragma unroll 4
  for (int j = 0; j < 32; ++j) {
    int g = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) g |= static_cast<int>((ids[b] >> j) & 1u) << b;
    const __half a = alpha[g];
    dst[j] = ((s >> j) & 1u) ? a : __hneg(a);
  }
}

template <int M, int R, int VEC, int FMT, typename CodeT>
void launch_gemv_t(const BinaryGemvArgs& a, cudaStream_t stream) {
  const int threads = 256, warps = (a.N + R - 1) / R;
  const int blocks = (warps * 32 + threads - 1) / threads;
  binary_gemv_kernel<M, R, VEC, FMT, CodeT><<<blocks, threads, 0, stream>>>(
      static_cast<const __half*>(a.x), a.ldx, static_cast<const uint32_t*>(a.signs), a.Kw,
      static_cast<const __half*>(a.scales), a.G, a.words_per_group, a.row_ptr,
      FMT == FMT_BITMAP ? static_cast<const uint32_t*>(a.positions) : nullptr,
      FMT == FMT_CSR ? static_cast<const uint16_t*>(a.positions) : nullptr,
      static_cast<const CodeT*>(a.codes), static_cast<const __half*>(a.sal_scale),
      static_cast<const __half*>(a.sal_zero), static_cast<__half*>(a.y), a.N);
}

template <int M, int R, int VEC>
void launch_gemv_fmt(const BinaryGemvArgs& a, cudaStream_t s) {
  if (a.fmt == FMT_NONE) launch_gemv_t<M, R, VEC, FMT_NONE, uint8_t>(a, s);
  else if (a.fmt == FMT_CSR && !a.wide_codes) launch_gemv_t<M, R, VEC, FMT_CSR, uint8_t>(a, s);
  else if (a.fmt == FMT_CSR) launch_gemv_t<M, R, VEC, FMT_CSR, uint16_t>(a, s);
  else if (!a.wide_codes) launch_gemv_t<M, R, VEC, FMT_BITMAP, uint8_t>(a, s);
  else launch_gemv_t<M, R, VEC, FMT_BITMAP, uint16_t>(a, s);
}

template <int M, int R>
void launch_gemv_vec(const BinaryGemvArgs& a, cudaStream_t s) {
  if (a.Kw % 4 == 0) launch_gemv_fmt<M, R, 4>(a, s);
  else launch_gemv_fmt<M, R, 1>(a, s);
}

template <int S, int FMT, typename CodeT, bool GROUPED>
cudaError_t launch_lut_t(const BinaryGemvArgs& a, int group_shift, cudaStream_t stream) {
  auto kernel = binary_gemv_lut_kernel<S, FMT, CodeT, GROUPED>;
  // 64 KB of dynamic shared memory is above the 48 KB default: opt in (per device, once).
  static bool configured[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 64 || !configured[dev]) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 LUT_SMEM_BYTES);
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[dev] = true;
  }
  const int rows = 32 * (LUT_WARPS / S), blocks = (a.N + rows - 1) / rows;
  kernel<<<blocks, LUT_THREADS, LUT_SMEM_BYTES, stream>>>(
      static_cast<const __half*>(a.x), static_cast<const uint32_t*>(a.signs), a.Kw,
      static_cast<const __half*>(a.scales), a.G, group_shift, a.row_ptr,
      FMT == FMT_BITMAP ? static_cast<const uint32_t*>(a.positions) : nullptr,
      FMT == FMT_CSR ? static_cast<const uint16_t*>(a.positions) : nullptr,
      static_cast<const CodeT*>(a.codes), static_cast<const __half*>(a.sal_scale),
      static_cast<const __half*>(a.sal_zero), static_cast<__half*>(a.y), a.N);
  return cudaGetLastError();
}

template <int S, bool GROUPED>
cudaError_t launch_lut_fmt(const BinaryGemvArgs& a, int shift, cudaStream_t s) {
  if (a.fmt == FMT_NONE) return launch_lut_t<S, FMT_NONE, uint8_t, GROUPED>(a, shift, s);
  if (a.fmt == FMT_CSR && !a.wide_codes) return launch_lut_t<S, FMT_CSR, uint8_t, GROUPED>(a, shift, s);
  if (a.fmt == FMT_CSR) return launch_lut_t<S, FMT_CSR, uint16_t, GROUPED>(a, shift, s);
  if (!a.wide_codes) return launch_lut_t<S, FMT_BITMAP, uint8_t, GROUPED>(a, shift, s);
  return launch_lut_t<S, FMT_BITMAP, uint16_t, GROUPED>(a, shift, s);
}

// The lookup-table kernel takes M = 1, whole 128-column sign chunks and power-of-two groups.
int lut_group_shift(const BinaryGemvArgs& a) {
  if (a.M != 1 || a.Kw % 4 != 0) return -1;
  if (a.G == 1) return 0;
  const int wpg = a.words_per_group;
  if (wpg <= 0 || (wpg & (wpg - 1)) != 0) return -1;
  return __builtin_ctz(wpg);
}

cudaError_t launch_lut(const BinaryGemvArgs& a, int shift, cudaStream_t s) {
  // K splits per block: 4 (64 rows a block) when that still gives two blocks per SM, else 8
  // (32 rows a block, more blocks for small N).
  int splits = a.lut_splits;
  if (splits == 0) {
    int dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    splits = (a.N + 63) / 64 >= 2 * sms ? 4 : 8;
  }
  const bool grouped = a.G != 1;
  if (splits == 4) return grouped ? launch_lut_fmt<4, true>(a, shift, s) : launch_lut_fmt<4, false>(a, shift, s);
  if (splits == 8) return grouped ? launch_lut_fmt<8, true>(a, shift, s) : launch_lut_fmt<8, false>(a, shift, s);
  return cudaErrorInvalidValue;
}

template <int FMT, typename CodeT>
void launch_scatter_t(const BinaryGemvArgs& a, cudaStream_t s) {
  salient_scatter_kernel<FMT, CodeT><<<(a.N * 32 + 255) / 256, 256, 0, s>>>(
      a.row_ptr, FMT == FMT_BITMAP ? static_cast<const uint32_t*>(a.positions) : nullptr,
      FMT == FMT_CSR ? static_cast<const uint16_t*>(a.positions) : nullptr, a.Kw,
      static_cast<const CodeT*>(a.codes), static_cast<const __half*>(a.sal_scale),
      static_cast<const __half*>(a.sal_zero), static_cast<__half*>(a.y), a.N);
}

}  // namespace

cudaError_t launch_binary_gemv(const BinaryGemvArgs& a, cudaStream_t s) {
  // algo 2 asks for the lookup-table kernel; shapes it does not take use the sign-flip kernel.
  // (Default stays sign-flip until the lookup-table kernel is measured on a GPU: docs/kernels.md.)
  if (a.algo == 2) {
    const int shift = lut_group_shift(a);
    if (shift >= 0) return launch_lut(a, shift, s);
  }
  // rows per warp: more rows share each x load, fewer give more warps in flight. Measured on
  // H100 (benchmarks/results): binary M=1 fastest at 4 for N >= 4096, 1 below; the bitmap
  // salient path (serial per-bit loop) at 2.
  int R = a.rows_per_warp;
  if (R == 0 && a.M == 1) R = a.fmt == FMT_BITMAP ? 2 : (a.N >= 4096 ? 4 : 1);
  if (R == 0) R = a.M == 2 ? 2 : 1;
  if (a.M == 1 && R == 1) launch_gemv_vec<1, 1>(a, s);
  else if (a.M == 1 && R == 2) launch_gemv_vec<1, 2>(a, s);
  else if (a.M == 1 && R == 4) launch_gemv_vec<1, 4>(a, s);
  else if (a.M == 2 && R == 1) launch_gemv_vec<2, 1>(a, s);
  else if (a.M == 2 && R == 2) launch_gemv_vec<2, 2>(a, s);
  else if (a.M == 4) launch_gemv_vec<4, 1>(a, s);
  else if (a.M == 8) launch_gemv_vec<8, 1>(a, s);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_binary_dequant(const BinaryGemvArgs& a, cudaStream_t s) {
  const size_t total = (size_t)a.N * a.Kw * 4;
  binary_dequant_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(
      static_cast<const uint32_t*>(a.signs), a.Kw, static_cast<const __half*>(a.scales), a.G,
      a.words_per_group, static_cast<__half*>(a.y), a.N);
  if (a.fmt == FMT_CSR && !a.wide_codes) launch_scatter_t<FMT_CSR, uint8_t>(a, s);
  else if (a.fmt == FMT_CSR) launch_scatter_t<FMT_CSR, uint16_t>(a, s);
  else if (a.fmt == FMT_BITMAP && !a.wide_codes) launch_scatter_t<FMT_BITMAP, uint8_t>(a, s);
  else if (a.fmt == FMT_BITMAP) launch_scatter_t<FMT_BITMAP, uint16_t>(a, s);
  return cudaGetLastError();
}

cudaError_t launch_w1a1x4(const W1A1x4Args& a, cudaStream_t s) {
  dim3 block(TN, TM), grid((a.N + TN - 1) / TN, (a.M + TM - 1) / TM);
  w1a1x4_kernel<<<grid, block, 0, s>>>(
      static_cast<const uint32_t*>(a.planes), a.M, static_cast<const uint32_t*>(a.signs),
      static_cast<const uint32_t*>(a.gbits), a.Kw, static_cast<const __half*>(a.scales),
      a.wsum, a.xs, a.xz, a.y, a.N);
  return cudaGetLastError();
}

cudaError_t launch_grouped_gemv(const GroupedArgs& a, cudaStream_t s) {
  if (a.M < 1 || a.M > 8 || a.P < 0 || a.P > 8 || a.G > 256) return cudaErrorInvalidValue;
  const int threads = 256, rows = threads / 32, blocks = (a.N + rows - 1) / rows;
  const size_t smem = (size_t)rows * a.G * sizeof(float);
  const int stride = a.per_row_scales ? a.G : 0;
  const auto* x = a.x;
  const auto* sg = static_cast<const uint32_t*>(a.signs);
  const auto* pl = static_cast<const uint32_t*>(a.planes);
  const auto* sc = static_cast<const __half*>(a.scales);
  if (a.M == 1) grouped_gemv_kernel<1><<<blocks, threads, smem, s>>>(x, a.M, a.ldx, sg, pl, a.P, a.Kw, sc, a.G, stride, a.y, a.N);
  else if (a.M == 2) grouped_gemv_kernel<2><<<blocks, threads, smem, s>>>(x, a.M, a.ldx, sg, pl, a.P, a.Kw, sc, a.G, stride, a.y, a.N);
  else if (a.M <= 4) grouped_gemv_kernel<4><<<blocks, threads, smem, s>>>(x, a.M, a.ldx, sg, pl, a.P, a.Kw, sc, a.G, stride, a.y, a.N);
  else grouped_gemv_kernel<8><<<blocks, threads, smem, s>>>(x, a.M, a.ldx, sg, pl, a.P, a.Kw, sc, a.G, stride, a.y, a.N);
  return cudaGetLastError();
}

cudaError_t launch_grouped_dequant(const GroupedArgs& a, void* out, cudaStream_t s) {
  if (a.P < 0 || a.P > 8 || a.G > 256) return cudaErrorInvalidValue;
  const size_t total = (size_t)a.N * a.Kw;
  grouped_dequant_kernel<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(
      static_cast<const uint32_t*>(a.signs), static_cast<const uint32_t*>(a.planes), a.P, a.Kw,
      static_cast<const __half*>(a.scales), a.G, a.per_row_scales ? a.G : 0,
      static_cast<__half*>(out), a.N);
  return cudaGetLastError();
}

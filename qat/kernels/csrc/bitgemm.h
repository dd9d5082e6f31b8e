// Launchers for the packed binary-weight kernels. Plain CUDA: no torch headers, so nvcc alone
// compiles bitgemm.cu (the CPU test does); bindings.cpp adapts torch tensors to these structs.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

struct BinaryGemvArgs {
  int M, N, Kw, G, words_per_group, fmt;  // fmt: 0 none, 1 CSR, 2 bitmap
  int rows_per_warp;                      // sign-flip gemv: 0 = default, else 1, 2 or 4 (M = 1)
  int algo;                               // gemv: 0 = default, 1 = sign-flip, 2 = lookup table
  int lut_splits;                         // lookup-table gemv: K splits per block, 0 = auto, 4 or 8
  bool wide_codes;                        // salient codes int16 (9..16 bits) instead of uint8
  const void* x; int ldx;                 // fp16 [M, ldx], ldx = 32 * Kw, zero padded
  const void* signs;                      // int32 [N, Kw]
  const void* scales;                     // fp16 [N, G]
  const int* row_ptr;                     // int32 [N + 1]      (fmt != 0)
  const void* positions;                  // uint16 [nnz] CSR columns, or int32 [N, Kw] bitmap
  const void* codes;                      // uint8 / int16 [nnz]
  const void* sal_scale; const void* sal_zero;  // fp16 [N]
  void* y;                                // gemv: fp16 [M, N]; dequant: fp16 [N, 32 * Kw]
};

struct W1A1x4Args {
  int M, N, Kw;
  const void* planes;  // int32 [4, M, Kw]
  const void* signs;   // int32 [N, Kw]
  const void* gbits;   // int32 [N, Kw] or nullptr (one scale per row)
  const void* scales;  // fp16 [N, 2]
  const float* wsum;   // fp32 [N]: sum_j w_nj (the zero-point term)
  const float* xs; const float* xz;  // fp32 [M]: per-token scale and zero point
  float* y;            // fp32 [M, N]
};

struct GroupedArgs {   // dynamic grouping (qat/methods/dyngroup.py)
  int M, N, Kw, P, G;  // P group-id planes (0..8), G scales per row or per matrix (<= 256)
  bool per_row_scales; // scales [N, G] (true) or [1, G]
  const float* x; int ldx;  // fp32 [M, ldx], ldx = 32 * Kw, zero padded; M <= 8
  const void* signs;   // int32 [N, Kw]
  const void* planes;  // int32 [P, N, Kw]
  const void* scales;  // fp16
  float* y;            // fp32 [M, N]
};

// M must be 1, 2, 4 or 8 (the binding pads); returns the launch's error code.
cudaError_t launch_binary_gemv(const BinaryGemvArgs& args, cudaStream_t stream);
cudaError_t launch_binary_dequant(const BinaryGemvArgs& args, cudaStream_t stream);
cudaError_t launch_w1a1x4(const W1A1x4Args& args, cudaStream_t stream);
cudaError_t launch_grouped_gemv(const GroupedArgs& args, cudaStream_t stream);
cudaError_t launch_grouped_dequant(const GroupedArgs& args, void* out, cudaStream_t stream);  // fp16 [N, 32 * Kw]

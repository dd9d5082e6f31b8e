// torch <-> launcher glue for bitgemm.cu. Shapes are checked here, once, with clear messages.
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include "bitgemm.h"

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be on a CUDA device");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

BinaryGemvArgs binary_args(const torch::Tensor& signs, const torch::Tensor& scales,
                           int64_t words_per_group, int64_t fmt, const torch::Tensor& row_ptr,
                           const torch::Tensor& positions, const torch::Tensor& codes,
                           const torch::Tensor& sal_scale, const torch::Tensor& sal_zero) {
  check(signs, "signs");
  check(scales, "scales");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf, "scales must be fp16");
  BinaryGemvArgs a{};
  a.N = signs.size(0);
  a.Kw = signs.size(1);
  a.G = scales.size(1);
  a.words_per_group = words_per_group;
  a.fmt = fmt;
  a.signs = signs.data_ptr();
  a.scales = scales.data_ptr();
  if (fmt) {
    check(row_ptr, "row_ptr");
    check(positions, "positions");
    check(codes, "codes");
    a.wide_codes = codes.scalar_type() == torch::kInt16;
    a.row_ptr = row_ptr.data_ptr<int>();
    a.positions = positions.data_ptr();
    a.codes = codes.data_ptr();
    a.sal_scale = sal_scale.data_ptr();
    a.sal_zero = sal_zero.data_ptr();
  }
  return a;
}

}  // namespace

// x fp16 [M, 32*Kw], M in {1, 2, 4, 8} (the Python side pads). Returns fp16 [M, N].
// algo: 0 default, 1 sign-flip, 2 lookup table (M = 1, K % 128 == 0; else sign-flip).
torch::Tensor binary_gemv(torch::Tensor x, torch::Tensor signs, torch::Tensor scales,
                          int64_t words_per_group, int64_t fmt, torch::Tensor row_ptr,
                          torch::Tensor positions, torch::Tensor codes, torch::Tensor sal_scale,
                          torch::Tensor sal_zero, int64_t rows_per_warp, int64_t algo,
                          int64_t lut_splits) {
  TORCH_CHECK(algo >= 0 && algo <= 2, "algo must be 0 (default), 1 (sign-flip) or 2 (lookup table), got ", algo);
  TORCH_CHECK(lut_splits == 0 || lut_splits == 4 || lut_splits == 8, "lut_splits must be 0, 4 or 8, got ", lut_splits);
  check(x, "x");
  TORCH_CHECK(x.scalar_type() == torch::kHalf, "x must be fp16");
  auto a = binary_args(signs, scales, words_per_group, fmt, row_ptr, positions, codes, sal_scale,
                       sal_zero);
  TORCH_CHECK(x.size(1) == (int64_t)a.Kw * 32, "x must be zero padded to 32 * words columns");
  auto y = torch::empty({x.size(0), (int64_t)a.N}, x.options());
  a.M = x.size(0);
  a.rows_per_warp = rows_per_warp;
  a.algo = algo;
  a.lut_splits = lut_splits;
  a.x = x.data_ptr();
  a.ldx = x.size(1);
  a.y = y.data_ptr();
  check_launch(launch_binary_gemv(a, c10::cuda::getCurrentCUDAStream()), "binary_gemv");
  return y;
}

// Returns the dense fp16 weight [N, 32*Kw] (the caller narrows to K).
torch::Tensor binary_dequant(torch::Tensor signs, torch::Tensor scales, int64_t words_per_group,
                             int64_t fmt, torch::Tensor row_ptr, torch::Tensor positions,
                             torch::Tensor codes, torch::Tensor sal_scale,
                             torch::Tensor sal_zero) {
  auto a = binary_args(signs, scales, words_per_group, fmt, row_ptr, positions, codes, sal_scale,
                       sal_zero);
  auto w = torch::empty({(int64_t)a.N, (int64_t)a.Kw * 32}, scales.options());
  a.y = w.data_ptr();
  check_launch(launch_binary_dequant(a, c10::cuda::getCurrentCUDAStream()), "binary_dequant");
  return w;
}

// planes int32 [4, M, Kw]; gbits empty or int32 [N, Kw]. Returns fp32 [M, N].
torch::Tensor w1a1x4_gemm(torch::Tensor planes, torch::Tensor signs, torch::Tensor gbits,
                          torch::Tensor scales, torch::Tensor wsum, torch::Tensor xs,
                          torch::Tensor xz) {
  check(planes, "planes");
  check(signs, "signs");
  check(scales, "scales");
  TORCH_CHECK(planes.size(0) == 4 && planes.size(2) == signs.size(1),
              "planes must be [4, M, Kw] with the weights' Kw");
  W1A1x4Args a{};
  a.M = planes.size(1);
  a.N = signs.size(0);
  a.Kw = signs.size(1);
  auto y = torch::empty({(int64_t)a.M, (int64_t)a.N}, planes.options().dtype(torch::kFloat));
  a.planes = planes.data_ptr();
  a.signs = signs.data_ptr();
  a.gbits = gbits.numel() ? gbits.data_ptr() : nullptr;
  a.scales = scales.data_ptr();
  a.wsum = wsum.data_ptr<float>();
  a.xs = xs.data_ptr<float>();
  a.xz = xz.data_ptr<float>();
  a.y = y.data_ptr<float>();
  check_launch(launch_w1a1x4(a, c10::cuda::getCurrentCUDAStream()), "w1a1x4_gemm");
  return y;
}

GroupedArgs grouped_args(const torch::Tensor& signs, const torch::Tensor& planes,
                         const torch::Tensor& scales) {
  check(signs, "signs");
  check(planes, "group_planes");
  check(scales, "scales");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf, "scales must be fp16");
  TORCH_CHECK(planes.dim() == 3 && planes.size(0) <= 8, "group_planes must be [P <= 8, N, Kw]");
  TORCH_CHECK(scales.size(1) <= 256, "at most 256 groups");
  GroupedArgs a{};
  a.N = signs.size(0);
  a.Kw = signs.size(1);
  a.P = planes.size(0);
  a.G = scales.size(1);
  TORCH_CHECK(a.P == 0 || (planes.size(1) == a.N && planes.size(2) == a.Kw), "group_planes must match signs");
  TORCH_CHECK(scales.size(0) == 1 || scales.size(0) == a.N, "scales must be [1, G] or [N, G]");
  a.per_row_scales = scales.size(0) == a.N && a.N > 1;
  a.signs = signs.data_ptr();
  a.planes = planes.data_ptr();
  a.scales = scales.data_ptr();
  return a;
}

// x fp32 [M <= 8, 32*Kw] zero padded. Returns fp32 [M, N].
torch::Tensor grouped_binary_gemv(torch::Tensor x, torch::Tensor signs, torch::Tensor planes,
                                  torch::Tensor scales) {
  check(x, "x");
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "x must be fp32");
  auto a = grouped_args(signs, planes, scales);
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "x must have 1..8 rows");
  TORCH_CHECK(x.size(1) == (int64_t)a.Kw * 32, "x must be zero padded to 32 * words columns");
  auto y = torch::empty({x.size(0), (int64_t)a.N}, x.options());
  a.M = x.size(0);
  a.x = x.data_ptr<float>();
  a.ldx = x.size(1);
  a.y = y.data_ptr<float>();
  check_launch(launch_grouped_gemv(a, c10::cuda::getCurrentCUDAStream()), "grouped_binary_gemv");
  return y;
}

// Returns the dense fp16 weight [N, 32*Kw] (the caller narrows to K).
torch::Tensor grouped_binary_dequant(torch::Tensor signs, torch::Tensor planes, torch::Tensor scales) {
  auto a = grouped_args(signs, planes, scales);
  auto w = torch::empty({(int64_t)a.N, (int64_t)a.Kw * 32}, scales.options());
  check_launch(launch_grouped_dequant(a, w.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "grouped_binary_dequant");
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("binary_gemv", &binary_gemv, "W1A16 GEMV for small M, PB-LLM salient part fused",
        py::arg("x"), py::arg("signs"), py::arg("scales"), py::arg("words_per_group"), py::arg("fmt"),
        py::arg("row_ptr"), py::arg("positions"), py::arg("codes"), py::arg("sal_scale"),
        py::arg("sal_zero"), py::arg("rows_per_warp") = 0, py::arg("algo") = 0,
        py::arg("lut_splits") = 0);
  m.def("binary_dequant", &binary_dequant, "packed binary (+salient) weight -> dense fp16");
  m.def("grouped_binary_gemv", &grouped_binary_gemv, "dynamic grouping W1A16 GEMV, fp32 sums");
  m.def("grouped_binary_dequant", &grouped_binary_dequant, "dynamic grouping packed weight -> dense fp16");
  m.def("w1a1x4_gemm", &w1a1x4_gemm, "W1A1 bit-serial GEMM over 4 INT4 activation bit planes");
}

"""The packed ops as torch.library custom ops: the reference is the default kernel (any device);
the CPU kernels (C++, csrc/cpu_kernels.cpp) and the CUDA kernels (csrc/bitgemm.cu) are registered
for the same ops and used when their extension builds. `kernel_calls()` counts which path ran.

  qat::binary_gemm   y = x · Wᵀ, W = alpha·sign (+ PB-LLM salient values)   [W1A16]
  qat::grouped_binary_gemm   y = x · Wᵀ, W = sign·alpha[group id] (dynamic grouping)  [W1A16]
  qat::w1a1x4_gemm   y = xs·(Σ_b 2^b·W q_b − xz·W1), activations as 4 bit planes [W1A1×4]
  qat::int_row_gemm  y = x · Wᵀ, W = int8 / int4 codes · one scale per row (the quantized LM head)
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from qat.kernels import reference
from qat.kernels.build import cpu_extension_or_none, cpu_isa_name, extension_or_none, kernels_disabled

# CPU: up to this many tokens the C++ kernels read the packed bits directly (decode); above, they
# unpack the weight to fp32 once and call at::mm (compute-bound; benchmarks/cpu_bitgemm.py), except
# binary_gemm on AVX-512, whose table kernel runs at every M (tiles of tokens; faster than at::mm there)
CPU_MAX_M_SMALL = 8
_CALLS: Counter = Counter()


def kernel_calls(reset: bool = False) -> dict[str, int]:
    """{"<op>/<path>": calls} since the last reset; path: cpu-avx512 | cpu-avx2 | cpu-portable |
    cuda | reference."""
    out = dict(sorted(_CALLS.items()))
    if reset:
        _CALLS.clear()
    return out


def _cpu_ext(op: str):
    """The CPU extension (None: use the reference), counting the path this call takes."""
    ext = cpu_extension_or_none()
    _CALLS[_path_key(op, cpu_isa_name(ext) if ext is not None else None)] += 1
    return ext


@functools.cache
def _path_key(op: str, isa: str | None) -> str:  # formatted once: decode calls this ~200 times a token
    return f"{op}/cpu-{isa}" if isa is not None else f"{op}/reference"


# above this the CUDA path dequantizes the weight to fp16 and multiplies with cuBLAS (in fp32 unless the
# activations are fp16); up to it the GEMV kernels take fp16 activations (H100: GEMV wins at M<=2)
GEMV_MAX_M = 2
GEMV_TILE_M = 8  # the GEMV kernel takes up to 8 tokens per launch
# M = 1 kernel: "signflip" (measured on H100, the default) or "lut" (lookup tables: fewer
# instructions per weight, not yet measured on a GPU; docs/kernels.md). QAT_GEMV_ALGO picks.
GEMV_ALGOS = {"signflip": 1, "lut": 2}


def gemv_algo() -> int:
    name = os.environ.get("QAT_GEMV_ALGO", "signflip")
    if name not in GEMV_ALGOS:
        raise ValueError(f"QAT_GEMV_ALGO={name!r} is not one of {sorted(GEMV_ALGOS)}")
    return GEMV_ALGOS[name]


@torch.library.custom_op("qat::binary_gemm", mutates_args=())
def binary_gemm(
    x: Tensor, signs: Tensor, scales: Tensor, in_features: int, salient_format: int,
    row_ptr: Tensor | None, positions: Tensor | None, codes: Tensor | None,
    sal_scale: Tensor | None, sal_zero: Tensor | None,
) -> Tensor:
    _CALLS["binary_gemm/reference"] += 1
    return _binary_gemm_ref(x, signs, scales, in_features, salient_format, row_ptr, positions, codes,
                            sal_scale, sal_zero)


def _binary_gemm_ref(x, signs, scales, in_features, salient_format, row_ptr, positions, codes, sal_scale,
                     sal_zero):
    lead = x.shape[:-1]
    y = reference.binary_gemm(x.reshape(-1, in_features), signs, scales, in_features,
                              salient_format, row_ptr, positions, codes, sal_scale, sal_zero)
    return y.reshape(*lead, signs.shape[0])


@binary_gemm.register_kernel("cpu")
def _binary_gemm_cpu(x, signs, scales, in_features, salient_format, row_ptr, positions, codes,
                     sal_scale, sal_zero):
    ext = _cpu_ext("binary_gemm")
    if ext is None:
        return _binary_gemm_ref(x, signs, scales, in_features, salient_format, row_ptr, positions, codes,
                                sal_scale, sal_zero)
    empty = signs.new_empty(0)
    sal = [t if t is not None else empty for t in (row_ptr, positions, codes, sal_scale, sal_zero)]
    return ext.binary_gemm(x, signs, scales, in_features, salient_format, *sal, empty, empty, CPU_MAX_M_SMALL)


@binary_gemm.register_fake
def _(x, signs, scales, in_features, salient_format, row_ptr, positions, codes, sal_scale, sal_zero):
    return x.new_empty(*x.shape[:-1], signs.shape[0])


@binary_gemm.register_kernel("cuda")
def _binary_gemm_cuda(x, signs, scales, in_features, salient_format, row_ptr, positions, codes,
                      sal_scale, sal_zero):
    ext = extension_or_none()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    n_words, groups = signs.shape[1], scales.shape[1]
    # the kernels index scales by 32-column word: one scale per row always fits (the padding
    # columns meet zero activations); groups must be whole words
    words_per_group = n_words if groups == 1 else n_words // groups if in_features % (32 * groups) == 0 else 0
    if ext is None or words_per_group == 0 or salient_format == reference.SALIENT_SLOTS:  # slots: a CPU layout
        _CALLS["binary_gemm/reference"] += 1
        y = reference.binary_gemm(x2, signs, scales, in_features, salient_format, row_ptr,
                                  positions, codes, sal_scale, sal_zero)
        return y.reshape(*lead, signs.shape[0])
    empty = signs.new_empty(0)
    sal = [t if t is not None else empty for t in (row_ptr, positions, codes, sal_scale, sal_zero)]
    m = x2.shape[0]
    if m <= GEMV_MAX_M:
        _CALLS["binary_gemm/cuda-gemv"] += 1
        y = torch.cat([_gemv(ext, x2[i: i + GEMV_TILE_M], signs, scales, in_features,
                             words_per_group, salient_format, sal)
                       for i in range(0, m, GEMV_TILE_M)])
    else:
        _CALLS["binary_gemm/cuda-dequant-mm"] += 1
        w = ext.binary_dequant(signs, scales, words_per_group, salient_format, *sal)
        y = dense_product(x2, w[:, :in_features])
    return y.to(x.dtype).reshape(*lead, signs.shape[0])


def dense_product(x2: Tensor, w16: Tensor) -> Tensor:
    """x · Wᵀ with W dequantized to fp16 by a kernel: in fp16 only for fp16 inputs, else in fp32,
    so that fp32 / bf16 activations are neither rounded to fp16 (nor overflow it) and the result
    does not depend on the device (the CPU paths compute in fp32)."""
    dtype = torch.float16 if x2.dtype == torch.float16 else torch.float32
    return x2.to(dtype) @ w16.to(dtype).t()


def _gemv(ext, x2, signs, scales, in_features, words_per_group, salient_format, sal):
    m, n_words = x2.shape[0], signs.shape[1]
    m_pad = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8
    if m_pad == m and in_features == n_words * 32 and x2.dtype == torch.float16:
        xh = x2.contiguous()  # the common decode case: no copy
    else:
        xh = torch.zeros(m_pad, n_words * 32, dtype=torch.float16, device=x2.device)
        xh[:m, :in_features] = x2
    return ext.binary_gemv(xh, signs, scales, words_per_group, salient_format, *sal, algo=gemv_algo())[:m]


def binary_gemm_cpu_call(signs: Tensor, scales: Tensor, in_features: int, salient_format: int,
                         row_ptr: Tensor | None, positions: Tensor | None, codes: Tensor | None,
                         sal_scale: Tensor | None, sal_zero: Tensor | None,
                         input_scale: Tensor | None = None,
                         signs_blocked: Tensor | None = None) -> Callable[[Tensor], Tensor | None] | None:
    """x -> (x / input_scale) · Wᵀ through the CPU extension with the layer's tensors bound once (the
    decode path of PackedLinear: ~4 µs of Python a call instead of ~15), with the derived
    reference.blocked_signs where given; None without the extension.
    A call returns None while QAT_KERNELS=reference is set: the op (its reference) runs instead."""
    ext = cpu_extension_or_none()
    if ext is None:
        return None
    empty = signs.new_empty(0)
    # the tensors converted and kept once in C++: a call converts x alone
    optional = (row_ptr, positions, codes, sal_scale, sal_zero, input_scale, signs_blocked)
    bound = ext.BoundBinaryGemm(signs, scales, in_features, salient_format,
                                *[t if t is not None else empty for t in optional], CPU_MAX_M_SMALL)

    def call(x: Tensor) -> Tensor | None:
        if kernels_disabled():
            return None
        _CALLS[_path_key("binary_gemm", cpu_isa_name(ext))] += 1
        return bound(x)  # any leading dims, x's dtype

    return call


@torch.library.custom_op("qat::w1a1x4_gemm", mutates_args=())
def w1a1x4_gemm(planes: Tensor, signs: Tensor, gbits: Tensor, scales: Tensor, wsum: Tensor,
                xs: Tensor, xz: Tensor) -> Tensor:
    _CALLS["w1a1x4_gemm/reference"] += 1
    return reference.w1a1x4_gemm(planes, signs, gbits, scales, wsum, xs, xz)


@w1a1x4_gemm.register_kernel("cpu")
def _w1a1x4_cpu(planes, signs, gbits, scales, wsum, xs, xz):
    ext = _cpu_ext("w1a1x4_gemm")
    if ext is None:
        return reference.w1a1x4_gemm(planes, signs, gbits, scales, wsum, xs, xz)
    return ext.w1a1x4_gemm(planes.contiguous(), signs.contiguous(), gbits.contiguous(), scales, wsum, xs, xz)


@w1a1x4_gemm.register_fake
def _(planes, signs, gbits, scales, wsum, xs, xz):
    return planes.new_empty(planes.shape[1], signs.shape[0], dtype=torch.float32)


@w1a1x4_gemm.register_kernel("cuda")
def _w1a1x4_cuda(planes, signs, gbits, scales, wsum, xs, xz):
    ext = extension_or_none()
    _CALLS["w1a1x4_gemm/" + ("cuda" if ext is not None else "reference")] += 1
    if ext is None:
        return reference.w1a1x4_gemm(planes, signs, gbits, scales, wsum, xs, xz)
    return ext.w1a1x4_gemm(planes.contiguous(), signs, gbits, scales.to(torch.float16).contiguous(),
                           wsum.float().contiguous(), xs.float().contiguous(), xz.float().contiguous())


@torch.library.custom_op("qat::grouped_binary_gemm", mutates_args=())
def grouped_binary_gemm(x: Tensor, signs: Tensor, group_planes: Tensor, scales: Tensor,
                        in_features: int) -> Tensor:
    _CALLS["grouped_binary_gemm/reference"] += 1
    lead = x.shape[:-1]
    y = reference.grouped_binary_gemm(x.reshape(-1, in_features), signs, group_planes, scales, in_features)
    return y.reshape(*lead, signs.shape[0])


@grouped_binary_gemm.register_kernel("cpu")
def _grouped_binary_gemm_cpu(x, signs, group_planes, scales, in_features):
    ext = _cpu_ext("grouped_binary_gemm")
    lead = x.shape[:-1]
    if ext is None:
        y = reference.grouped_binary_gemm(x.reshape(-1, in_features), signs, group_planes, scales, in_features)
    else:
        y = ext.grouped_binary_gemm(x.reshape(-1, in_features), signs.contiguous(), group_planes.contiguous(),
                                    scales, in_features, CPU_MAX_M_SMALL).to(x.dtype)
    return y.reshape(*lead, signs.shape[0])


@grouped_binary_gemm.register_fake
def _(x, signs, group_planes, scales, in_features):
    return x.new_empty(*x.shape[:-1], signs.shape[0])


@grouped_binary_gemm.register_kernel("cuda")
def _grouped_binary_gemm_cuda(x, signs, group_planes, scales, in_features):
    ext = extension_or_none()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if ext is None:
        _CALLS["grouped_binary_gemm/reference"] += 1
        y = reference.grouped_binary_gemm(x2, signs, group_planes, scales, in_features)
        return y.reshape(*lead, signs.shape[0])
    m, n_words = x2.shape[0], signs.shape[1]
    planes, sc = group_planes.contiguous(), scales.to(torch.float16).contiguous()
    if m <= GEMV_MAX_M:
        _CALLS["grouped_binary_gemm/cuda-gemv"] += 1
        # fp32 activations and sums: the scale lookup is exact, so is the product up to fp32
        xf = torch.zeros(m, n_words * 32, dtype=torch.float32, device=x.device)
        xf[:, :in_features] = x2
        y = ext.grouped_binary_gemv(xf, signs, planes, sc)
    else:
        _CALLS["grouped_binary_gemm/cuda-dequant-mm"] += 1
        w = ext.grouped_binary_dequant(signs, planes, sc)  # sign·alpha is exact in fp16
        y = dense_product(x2, w[:, :in_features])
    return y.to(x.dtype).reshape(*lead, signs.shape[0])


@torch.library.custom_op("qat::int_row_gemm", mutates_args=())
def int_row_gemm(x: Tensor, codes: Tensor, scale: Tensor, bits: int, in_features: int) -> Tensor:
    """y = x · Wᵀ, W = codes · scale[row] (int8, or int4 nibbles): the quantized LM head."""
    _CALLS["int_row_gemm/reference"] += 1
    lead = x.shape[:-1]
    return reference.int_row_gemm(x.reshape(-1, in_features), codes, scale, bits).reshape(*lead, codes.shape[0])


@int_row_gemm.register_fake
def _(x, codes, scale, bits, in_features):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@int_row_gemm.register_kernel("cpu")
def _int_row_gemm_cpu(x, codes, scale, bits, in_features):
    ext = _cpu_ext("int_row_gemm")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if ext is None:
        y = reference.int_row_gemm(x2, codes, scale, bits)
    else:
        y = ext.int_row_gemm(x2, codes.contiguous(), scale, bits, in_features, CPU_MAX_M_SMALL).to(x.dtype)
    return y.reshape(*lead, codes.shape[0])


# -- the public entry points ------------------------------------------------------------------
# On CPU tensors (outside torch.compile) the CPU kernel is called directly: the custom-op dispatch
# costs ~30 µs a call (measured), more than a decode-sized layer's kernel (~8 µs for 576x576).
# Everything else (CUDA, meta / fake tensors, torch.compile) goes through the registered op.
binary_gemm_op, grouped_binary_gemm_op = binary_gemm, grouped_binary_gemm
w1a1x4_gemm_op, int_row_gemm_op = w1a1x4_gemm, int_row_gemm


def _direct_on_cpu(op, cpu_kernel):
    def call(first: Tensor, *args):
        if first.device.type == "cpu" and not torch.compiler.is_compiling():
            return cpu_kernel(first, *args)
        return op(first, *args)

    call.__name__, call.__doc__ = op.__name__ if hasattr(op, "__name__") else "op", op.__doc__
    return call


binary_gemm = _direct_on_cpu(binary_gemm_op, _binary_gemm_cpu)
grouped_binary_gemm = _direct_on_cpu(grouped_binary_gemm_op, _grouped_binary_gemm_cpu)
w1a1x4_gemm = _direct_on_cpu(w1a1x4_gemm_op, _w1a1x4_cpu)
int_row_gemm = _direct_on_cpu(int_row_gemm_op, _int_row_gemm_cpu)

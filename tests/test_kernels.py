"""Packed ops: reference vs dense math (CPU), nvcc compile (CPU), CUDA vs reference (GPU).

Imports torch and qat.kernels only: this file runs on the bare GPU image.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from qat.kernels import ops, reference
from qat.kernels.build import CSRC, extension_or_none, nvcc_path
from qat.quant.activations import bit_planes, int4_per_token
from qat.quant.packing import pack_bits, unpack_bits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_packed(n: int, k: int, ratio: float, fmt: int, group: int = 0, bits: int = 8, seed: int = 0):
    """A random PB-LLM layer in packed form, and the dense fp32 weight it encodes (built here)."""
    g = torch.Generator().manual_seed(seed)
    signs_b = torch.rand(n, k, generator=g) < 0.5
    n_groups = 1 if group == 0 else k // group
    scales = (torch.rand(n, n_groups, generator=g) * 0.1 + 0.01).half()
    alpha = scales.float().repeat_interleave(k // n_groups, dim=1)
    w = torch.where(signs_b, alpha, -alpha)
    packed = dict(signs=pack_bits(signs_b), scales=scales, fmt=0, row_ptr=None, positions=None,
                  codes=None, sal_scale=None, sal_zero=None)
    if ratio > 0:
        mask = torch.rand(n, k, generator=g) < ratio
        mask[0] = False  # a row with no salient entry
        sal_scale = (torch.rand(n, generator=g) * 0.01 + 1e-3).half()
        sal_zero = torch.randint(0, 2**bits, (n,), generator=g).half()
        codes_dense = torch.randint(0, 2**bits, (n, k), generator=g)
        rows, cols = mask.nonzero(as_tuple=True)
        codes = codes_dense[rows, cols]
        w[rows, cols] = (codes.float() - sal_zero.float()[rows]) * sal_scale.float()[rows]
        row_ptr = torch.zeros(n + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
        positions = pack_bits(mask) if fmt == 2 else cols.to(torch.int32).to(torch.int16)
        signs_b = signs_b | mask  # salient positions carry sign +1
        packed.update(signs=pack_bits(signs_b), fmt=fmt, row_ptr=row_ptr, positions=positions,
                      codes=codes.to(torch.int32).to(torch.uint8 if bits <= 8 else torch.int16),
                      sal_scale=sal_scale, sal_zero=sal_zero)
    return packed, w


def call_binary_gemm(x, p, k):
    return ops.binary_gemm(x, p["signs"], p["scales"], k, p["fmt"], p["row_ptr"], p["positions"],
                           p["codes"], p["sal_scale"], p["sal_zero"])


def to(p, device):
    return {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in p.items()}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def row_rel_err(a, b):
    """The largest error of any output, relative to the largest output of its token."""
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)).max().item()


class ReferenceCudaExtension:
    """The CUDA extension's binary entry points computed by the reference on CPU tensors, so that
    the CUDA dispatch (which kernel, which dtype) is tested without a GPU."""

    def __init__(self):
        self.calls = []

    def binary_gemv(self, xh, signs, scales, words_per_group, fmt, *sal, algo):
        self.calls.append(("gemv", xh.dtype, words_per_group))
        sal = [t if t.numel() else None for t in sal]
        return reference.binary_gemm(xh.float(), signs, scales, xh.shape[1], fmt, *sal).half()

    def binary_dequant(self, signs, scales, words_per_group, fmt, *sal):
        self.calls.append(("dequant", None, words_per_group))
        sal = [t if t.numel() else None for t in sal]
        return reference.binary_weight(signs, scales, signs.shape[1] * 32, fmt, *sal).half()


@pytest.mark.parametrize("m,k,group,ratio,path,words", [
    (1, 513, 0, 0.1, "binary_gemm/cuda-gemv", 17),         # one scale per row: any K runs the kernel
    (16, 513, 0, 0.0, "binary_gemm/cuda-dequant-mm", 17),  # alpha·±1 is exact in the fp16 weight
    (1, 1024, 128, 0.1, "binary_gemm/cuda-gemv", 4),
    (1, 1000, 8, 0.1, "binary_gemm/reference", None),      # groups of 8 columns are not whole words
])
def test_cuda_dispatch_picks_the_kernel_and_keeps_fp32_activations(m, k, group, ratio, path, words, monkeypatch):
    fake = ReferenceCudaExtension()
    monkeypatch.setattr(ops, "extension_or_none", lambda: fake)
    p, _ = random_packed(64, k, ratio, 2 if ratio else 0, group, 8, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 300  # |x| past bf16-safe fp16 sums
    ops.kernel_calls(reset=True)
    y = ops._binary_gemm_cuda(x, p["signs"], p["scales"], k, p["fmt"], p["row_ptr"], p["positions"], p["codes"],
                              p["sal_scale"], p["sal_zero"])
    assert ops.kernel_calls(reset=True) == {path: 1}
    assert [c[2] for c in fake.calls] == ([words] if words else [])
    ref = call_binary_gemm(x, p, k)
    # above GEMV_MAX_M the product is fp32 (it was fp16: ~1e-3 off, device-dependent perplexity)
    tol = 2e-3 if path.endswith("gemv") else 1e-6
    assert row_rel_err(y, ref) < tol


def test_pack_roundtrip_odd_length():
    bits = torch.rand(5, 77) < 0.5
    words = pack_bits(bits)
    assert words.shape == (5, 3) and words.dtype == torch.int32
    assert torch.equal(unpack_bits(words, 77), bits)
    assert pack_bits(torch.tensor([True] + [False] * 31)).item() == 1
    assert pack_bits(torch.tensor([False] * 31 + [True])).item() == -(2**31)


@pytest.mark.parametrize("n,k,m,ratio,fmt,group,bits", [
    (7, 77, 1, 0.0, 0, 0, 8),        # K not a multiple of 32, M = 1
    (300, 96, 3, 0.1, 2, 32, 8),     # bitmap salient, column groups
    (64, 130, 5, 0.05, 1, 0, 8),     # CSR salient, odd K
    (2048, 64, 1, 0.2, 1, 0, 12),    # large N, 12-bit salient codes
])
def test_binary_gemm_reference_matches_dense(n, k, m, ratio, fmt, group, bits):
    p, w = random_packed(n, k, ratio, fmt, group, bits)
    x = torch.randn(m, k, dtype=torch.float64)
    y = call_binary_gemm(x, p, k)
    torch.testing.assert_close(y, x @ w.double().t(), rtol=1e-5, atol=1e-5)


def test_w1a1x4_reference_is_exact_given_int4():
    g = torch.Generator().manual_seed(1)
    m, n, k = 3, 17, 70
    x = torch.randn(m, k, generator=g)
    q, s, z = int4_per_token(x)
    signs_b, group_b = torch.rand(n, k, generator=g) < 0.5, torch.rand(n, k, generator=g) < 0.3
    scales = torch.rand(n, 2, generator=g).half()
    w = torch.where(signs_b, 1.0, -1.0) * torch.gather(scales.float(), 1, group_b.long())
    y = ops.w1a1x4_gemm(bit_planes(q), pack_bits(signs_b), pack_bits(group_b), scales,
                        w.sum(1), s, z)
    x_int4 = s[:, None] * (q.float() - z[:, None])
    torch.testing.assert_close(y, x_int4 @ w.t(), rtol=1e-4, atol=1e-4)
    assert rel_err(x_int4, x) < 0.15  # INT4 is a real approximation of x, not a no-op


@pytest.mark.skipif(nvcc_path() is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_sources_compile(arch, tmp_path: Path):
    out = tmp_path / f"bitgemm_sm{arch}.o"
    cmd = [nvcc_path(), "-c", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", "-I", str(CSRC), "-o", str(out), str(CSRC / "bitgemm.cu")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0
    # ptxas -v: "Compiling entry function 'NAME'", "Function properties", "S bytes stack frame, ..."
    frames = re.findall(r"entry function '(\w+)'[^\n]*\n[^\n]*Function properties[^\n]*\n"
                        r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores", res.stdout + res.stderr)
    lut = [(name, int(stack) + int(spill)) for name, stack, spill in frames if "binary_gemv_lut_kernel" in name]
    assert len(lut) == 2 * 5 * 2  # K splits x salient formats/code widths x grouped
    assert all(n == 0 for _, n in lut), lut  # no local memory: the words and sums stay in registers


def cuda_include_dir() -> Path | None:
    homes = [os.environ.get("CUDA_HOME", ""), str(Path(nvcc_path() or "/").resolve().parents[1])]
    homes += sorted(str(p) for p in Path("/usr/local").glob("cuda*"))
    return next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()), None)


@pytest.mark.skipif(shutil.which("g++") is None or nvcc_path() is None, reason="needs g++ and the CUDA headers")
def test_torch_bindings_compile(tmp_path: Path):
    """bindings.cpp against this torch's headers (syntax only: no GPU torch here to link with)."""
    from torch.utils import cpp_extension
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        pytest.skip("cuda_runtime.h not found")
    generated = "c10/cuda/impl/cuda_cmake_macros.h"  # written by CUDA builds of torch only
    if not any((Path(inc) / generated).exists() for inc in cpp_extension.include_paths()):
        (tmp_path / generated).parent.mkdir(parents=True)
        (tmp_path / generated).write_text("")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=qat_bitgemm",
           "-I", str(tmp_path), "-I", str(cuda_inc), "-I", str(CSRC), "-I", sysconfig.get_paths()["include"]]
    cmd += [a for inc in cpp_extension.include_paths() for a in ("-I", inc)]
    res = subprocess.run(cmd + [str(CSRC / "bindings.cpp")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.gpu
def test_extension_builds_on_gpu():
    assert extension_or_none() is not None


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 16, 200])
@pytest.mark.parametrize("n,k,ratio,fmt,group,bits", [
    (1000, 4096, 0.0, 0, 0, 8),
    (513, 1000, 0.1, 2, 0, 8),       # K not a multiple of 32
    (777, 2048, 0.05, 1, 128, 8),
    (256, 4096, 0.1, 2, 0, 12),
])
def test_binary_gemm_cuda_matches_reference(m, n, k, ratio, fmt, group, bits):
    p, _ = random_packed(n, k, ratio, fmt, group, bits, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half()
    ref = call_binary_gemm(x.double(), p, k)
    pc = to(p, "cuda")
    ops.kernel_calls(reset=True)
    y = call_binary_gemm(x.cuda(), pc, k)
    paths = ops.kernel_calls(reset=True)
    assert "binary_gemm/reference" not in paths, paths  # K = 513 too runs a CUDA kernel
    assert torch.isfinite(y).all()
    # per output: one wrong salient entry moves its output by far more than fp16 rounding
    assert row_rel_err(y.cpu(), ref) < 2e-3


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("splits", [4, 8])
@pytest.mark.parametrize("n,k,ratio,fmt,group,bits", [
    (1000, 4096, 0.0, 0, 0, 8),
    (513, 1000, 0.1, 2, 0, 8),       # K padded to 1024: one partial chunk of tables
    (300, 11008, 0.1, 2, 0, 8),      # 6 chunks, the last one partial; N not a multiple of 64
    (777, 4200, 0.05, 1, 0, 8),      # CSR salient
    (130, 2048, 0.1, 1, 128, 12),    # column groups (power of two words), 12-bit codes
    (64, 8192, 0.0, 0, 64, 8),
])
def test_lut_gemv_matches_reference(splits, n, k, ratio, fmt, group, bits):
    p, _ = random_packed(n, k, ratio, fmt, group, bits, seed=splits)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).half()
    ref = call_binary_gemm(x.double(), p, k)
    pc = to(p, "cuda")
    kw = pc["signs"].shape[1]
    xh = torch.zeros(1, 32 * kw, dtype=torch.float16, device="cuda")
    xh[:, :k] = x.cuda()
    empty = pc["signs"].new_empty(0)
    sal = [pc[key] if pc[key] is not None else empty for key in ("row_ptr", "positions", "codes", "sal_scale", "sal_zero")]
    wpg = kw // pc["scales"].shape[1]
    y = extension_or_none().binary_gemv(xh, pc["signs"], pc["scales"], wpg, fmt, *sal, algo=2, lut_splits=splits)
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu(), ref) < 2e-3


@cuda
@pytest.mark.gpu
def test_gemv_algo_env_selects_lut(monkeypatch):
    p, _ = random_packed(700, 4096, 0.1, 2, seed=3)
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(3)).half()
    ref = call_binary_gemm(x.double(), p, 4096)
    monkeypatch.setenv("QAT_GEMV_ALGO", "lut")
    y = call_binary_gemm(x.cuda(), to(p, "cuda"), 4096)
    assert rel_err(y.cpu(), ref) < 2e-3


def test_gemv_algo_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv("QAT_GEMV_ALGO", "fastest")
    with pytest.raises(ValueError, match="'fastest' is not one of"):
        ops.gemv_algo()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 300, 4096), (9, 257, 1000), (64, 1024, 2048)])
def test_w1a1x4_cuda_matches_reference(m, n, k):
    g = torch.Generator().manual_seed(m)
    q = torch.randint(0, 16, (m, k), generator=g)
    signs, gbits = pack_bits(torch.rand(n, k, generator=g) < 0.5), pack_bits(torch.rand(n, k, generator=g) < 0.5)
    scales = torch.rand(n, 2, generator=g).half()
    wsum, s, z = torch.randn(n, generator=g), torch.rand(m, generator=g), torch.randint(0, 16, (m,), generator=g).float()
    args = (bit_planes(q), signs, gbits, scales, wsum, s, z)
    ref = reference.w1a1x4_gemm(*args)
    y = ops.w1a1x4_gemm(*[a.cuda() for a in args])
    assert rel_err(y.cpu(), ref) < 1e-5
    y1 = ops.w1a1x4_gemm(*[a.cuda() for a in (bit_planes(q), signs, torch.empty(0, dtype=torch.int32), scales, wsum, s, z)])
    ref1 = reference.w1a1x4_gemm(bit_planes(q), signs, torch.empty(0, dtype=torch.int32), scales, wsum, s, z)
    assert rel_err(y1.cpu(), ref1) < 1e-5


def random_grouped(n: int, k: int, groups: int, per_row: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    signs_b = torch.rand(n, k, generator=g) < 0.5
    ids = torch.randint(0, groups, (n, k), generator=g)
    planes = [pack_bits(((ids >> b) & 1).bool()) for b in range((groups - 1).bit_length())]
    signs = pack_bits(signs_b)
    planes = torch.stack(planes) if planes else signs.new_empty(0, *signs.shape)
    scales = torch.rand(n if per_row else 1, groups, generator=g).half()
    dense = torch.where(signs_b, 1.0, -1.0) * torch.gather(scales.float().expand(n, -1), 1, ids)
    return (signs, planes, scales), dense


@pytest.mark.parametrize("groups,per_row", [(1, False), (2, True), (5, False), (32, True)])
def test_grouped_reference_matches_dense(groups, per_row):
    packed, dense = random_grouped(40, 100, groups, per_row)
    x = torch.randn(3, 100)
    torch.testing.assert_close(ops.grouped_binary_gemm(x, *packed, 100), x @ dense.t())


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 16])
@pytest.mark.parametrize("n,k,groups,per_row", [(1000, 4096, 4, False), (513, 1000, 5, True), (64, 2048, 1, False),
                                                (300, 11008, 256, True)])
def test_grouped_cuda_matches_reference(m, n, k, groups, per_row):
    packed, dense = random_grouped(n, k, groups, per_row, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    ref = x.double() @ dense.double().t()
    y = ops.grouped_binary_gemm(x.cuda(), *[t.cuda() for t in packed], k)
    assert torch.isfinite(y).all()
    assert rel_err(y.cpu().double(), ref) < (1e-5 if m <= ops.GEMV_MAX_M else 2e-3)  # fp32 GEMV; fp16 above


def test_kernel_modules_import_without_framework_deps():
    code = ("import sys; import qat.kernels, qat.quant; "
            "bad = [m for m in ('hydra', 'wandb', 'datasets', 'lightning') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

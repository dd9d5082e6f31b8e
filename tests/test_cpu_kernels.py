"""The CPU kernels (C++: AVX-512, AVX2 and portable paths) against the pure-torch reference, on
every packed format, for decode-sized and prefill-sized inputs. Needs a C++ compiler (built once,
~40 s, cached); torch alone otherwise."""
import pytest
import torch

from qat.kernels import ops, reference
from qat.kernels.build import CPU_ISAS, cpu_extension_or_none
from qat.methods import build_method

ext = cpu_extension_or_none()
pytestmark = pytest.mark.skipif(ext is None, reason="the CPU extension did not build (no C++ compiler?)")
ISAS = [name for name, i in CPU_ISAS.items() if ext is not None and i <= ext.best_isa()]
MS = [1, 3, 8, 9, 64, 130]  # 1..8: the bit kernels; above: binary_gemm's tables in tiles of tokens on AVX-512
# (130 > one tile at K = 576; 64 > one at K = 2080), unpack once + at::mm elsewhere


@pytest.fixture(params=ISAS)
def isa(request):
    before = ext.isa()
    ext.set_isa(CPU_ISAS[request.param])
    yield request.param
    ext.set_isa(before)


def close(y: torch.Tensor, want: torch.Tensor) -> None:
    """Within 1e-5 of each output row's largest value (a wrong entry anywhere shows)."""
    scale = want.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    assert ((y - want).abs() / scale).max() < 1e-5


def packed(method_name: str, out_f: int, in_f: int, seed: int = 0, **params):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column: salient entries cluster there
    method = build_method(method_name, **params)
    state = method.init_state(w)
    latent = state.pop("latent")
    stored = method.pack(latent, state)
    return method, {**stored, **method.derived(stored, in_f)}  # what the kernels read, as PackedLinear hands it


@pytest.mark.parametrize("shape,params", [
    ((96, 576), dict(salient_ratio=0.1)),                     # SmolLM2's width, CSR salient part
    ((40, 513), dict(salient_ratio=0.1)),                     # not a multiple of 32: padded
    ((64, 256), dict(salient_ratio=0.4)),                     # dense salient part: bitmap format
    ((48, 512), dict(salient_ratio=0.1, group_size=128)),     # alpha per 128 columns
    ((48, 576), dict(salient_ratio=0.1, group_size=48)),      # groups not whole 16-column halves
    ((33, 320), dict(salient_ratio=0.1, salient_bits=12)),    # int16 codes (unpacked from the 12-bit stream)
    ((40, 576), dict(salient_ratio=0.1, salient_bits=4)),     # uint8 codes (unpacked from the 4-bit stream)
    ((70, 640), dict(salient_ratio=0.0)),                     # rtn_binary: no salient part
    ((24, 2080), dict(salient_ratio=0.1)),                    # long rows: x beyond L1 for the salient gathers
    ((20, 2112), dict(salient_ratio=0.0, group_size=704)),    # groups of 22 words (whole words, not halves of 32)
])
@pytest.mark.parametrize("m", MS)
def test_binary_gemm_matches_reference(isa, shape, params, m):
    method, p = packed("pbllm_qat", *shape, **params)
    if params["salient_ratio"] == 0.4:
        assert int(p["salient_format"]) == reference.SALIENT_BITMAP
    x = torch.randn(m, shape[1])
    fmt = int(p["salient_format"]) if "salient_format" in p else 0
    args = (p["signs"], p["scales"], shape[1], fmt, p.get("salient_row_ptr"), p.get("salient_positions"),
            p.get("salient_codes"), p.get("salient_scale"), p.get("salient_zero"))
    want = reference.binary_gemm(x, *args)
    empty = p["signs"].new_empty(0)
    got = ext.binary_gemm(x, *args[:4], *[t if t is not None else empty for t in args[4:]], empty, empty, ops.CPU_MAX_M_SMALL)
    close(got, want)  # the stored format as it is
    # the layer's own call: on the CPU the salient part is handed to the kernel in its derived slot layout
    assert ("salient_slot_ptr" in p) == (fmt != reference.SALIENT_NONE)
    slots = method._salient_args(p)
    close(reference.binary_gemm(x, *args[:3], *slots), want)  # the layout's decoding: the same weight
    close(ext.binary_gemm(x, *args[:3], *[t if t is not None else empty for t in slots], empty, empty, ops.CPU_MAX_M_SMALL), want)
    # the signs in the table kernel's blocked layout (derived on the CPU): the same product
    blocked = p["signs_blocked"]
    assert blocked.shape == (-(-shape[0] // 16), p["signs"].shape[1], 16)
    close(ext.binary_gemm(x, *args[:3], *[t if t is not None else empty for t in slots], empty, blocked, ops.CPU_MAX_M_SMALL), want)
    close(method.packed_linear(x, p, shape[1]), want)
    # a smoothed layer's input_scale, applied inside the C++ call (PackedLinear's CPU path)
    s = torch.rand(shape[1]) + 0.5
    close(method.cpu_forward({**p, "input_scale": s}, shape[1])(x), reference.binary_gemm(x / s, *args))


def test_salient_slots_hold_every_entry_once_in_its_block_and_chunk():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(37, 100, generator=g) < 0.2
    mask[5] = False  # an empty row
    rows, cols = mask.nonzero(as_tuple=True)
    codes = torch.randint(0, 256, (rows.numel(),), generator=g).to(torch.uint8)
    words = 4  # ceil(100 / 32)
    ptr, slot_cols, slot_codes = reference.salient_slots(rows, cols, codes, 37, words)
    assert ptr.shape == (3 * words + 1,) and slot_cols.numel() == slot_codes.numel() == 16 * int(ptr[-1])
    r, c, at = reference.slot_entries(ptr, slot_cols, words)
    order = torch.argsort(r * 100 + c)
    assert torch.equal(r[order], rows) and torch.equal(c[order], cols) and torch.equal(slot_codes[at][order], codes)
    # each (block, chunk) has as many slots as its fullest row there: padding only where rows differ
    dense = torch.zeros(48, 128, dtype=torch.int64)
    dense[:37, :100] = mask.long()
    per = dense.view(3, 16, words, 32).sum(-1).amax(1).reshape(-1)
    assert torch.equal((ptr[1:] - ptr[:-1]).long(), per)


@pytest.mark.parametrize("groups,scope", [(2, "row"), (4, "row"), (8, "row"), (4, "matrix")])
@pytest.mark.parametrize("m", MS)
def test_grouped_binary_gemm_matches_reference(isa, groups, scope, m):
    _, p = packed("dyngroup", 80, 576, groups=groups, scope=scope)
    x = torch.randn(m, 576)
    want = reference.grouped_binary_gemm(x, p["signs"], p["group_planes"], p["scales"], 576)
    got = ext.grouped_binary_gemm(x, p["signs"], p["group_planes"], p["scales"], 576, ops.CPU_MAX_M_SMALL)
    close(got, want)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("k", [576, 200])
@pytest.mark.parametrize("m", MS)
def test_int_row_gemm_matches_reference(isa, bits, k, m):
    from qat.nn.embedding import quantize_matrix

    w = torch.randn(300, k) * 0.1
    codes, scale = quantize_matrix(w, bits)
    x = torch.randn(m, k)
    close(ext.int_row_gemm(x, codes, scale, bits, k, ops.CPU_MAX_M_SMALL), reference.int_row_gemm(x, codes, scale, bits))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("k", [576, 1024, 96])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_w1a1x4_gemm_matches_reference(isa, groups, k, m):
    from qat.quant.activations import bit_planes, int4_per_token

    method, p = packed("w11a14", 72, k, groups=groups)
    q, s, z = int4_per_token(torch.randn(m, k))
    planes = bit_planes(q)
    scales = p["scales"] if groups == 2 else p["scales"].expand(-1, 2).contiguous()
    gbits = p["group_planes"][0] if p["group_planes"].shape[0] else p["signs"].new_empty(0)
    want = reference.w1a1x4_gemm(planes, p["signs"], gbits, scales, p["wsum"][:, 0], s, z)
    got = ext.w1a1x4_gemm(planes, p["signs"], gbits, scales, p["wsum"][:, 0], s, z)
    close(got, want)


def test_the_ops_dispatch_to_the_cpu_kernels_and_count_the_path(monkeypatch):
    """A packed layer on a CPU runs the C++ kernel (kernel_calls names the path); QAT_KERNELS=reference
    runs the reference; both give the same output."""
    method, p = packed("pbllm_qat", 64, 576, salient_ratio=0.1)
    x = torch.randn(2, 5, 576)
    ops.kernel_calls(reset=True)
    fast = method.packed_linear(x, p, 576)
    assert ops.kernel_calls(reset=True) == {f"binary_gemm/cpu-{ISAS[-1]}": 1}
    monkeypatch.setenv("QAT_KERNELS", "reference")
    slow = method.packed_linear(x, p, 576)
    assert ops.kernel_calls(reset=True) == {"binary_gemm/reference": 1}
    assert fast.shape == slow.shape == (2, 5, 64)
    close(fast.reshape(10, 64), slow.reshape(10, 64))


def test_packed_linear_binds_its_cpu_call_and_matches_the_reference(monkeypatch):
    """PackedLinear on a CPU calls the C++ kernel with its tensors bound once (decode is Python-bound):
    the smoothed input_scale applied in C++, any leading dims, x's dtype, the bias; the result is the
    reference's. QAT_KERNELS=reference set afterwards still reaches the reference."""
    from qat.nn.packed_linear import PackedLinear

    method, p = packed("pbllm_qat", 64, 576, salient_ratio=0.1)
    stored = {k: p[k] for k in ("signs", "scales", "salient_format", "salient_positions", "salient_row_counts",
                                "salient_codes", "salient_scale", "salient_zero") if k in p}  # what pack() wrote
    stored["input_scale"] = (torch.rand(576) + 0.5).half()
    bias = torch.randn(64)
    layer = PackedLinear(576, 64, method, stored, bias)
    x = torch.randn(2, 3, 576)
    fmt = int(stored["salient_format"])
    want = reference.binary_gemm(x.reshape(6, 576) / stored["input_scale"].float(), stored["signs"], stored["scales"], 576,
                                 fmt, p["salient_row_ptr"], stored["salient_positions"], stored["salient_codes"],
                                 stored["salient_scale"], stored["salient_zero"]) + bias
    ops.kernel_calls(reset=True)
    y = layer(x)
    assert layer._cpu_forward is not None and ops.kernel_calls(reset=True) == {f"binary_gemm/cpu-{ISAS[-1]}": 1}
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    close(y.reshape(6, 64), want)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    monkeypatch.setenv("QAT_KERNELS", "reference")
    ops.kernel_calls(reset=True)
    close(layer(x).reshape(6, 64), want)
    assert ops.kernel_calls(reset=True) == {"binary_gemm/reference": 1}


def test_a_failed_build_is_tried_once_and_falls_back(monkeypatch):
    """No compiler: one warning, the reference from then on, and no second build attempt per call."""
    from qat.kernels import build

    calls = []

    def broken():
        calls.append(1)
        raise build.KernelBuildError("no C++ compiler (c++ / $CXX) found")

    monkeypatch.setattr(build, "_failed", {})
    monkeypatch.setattr(build, "load_cpu_extension", broken)
    method, p = packed("rtn_binary", 16, 64)
    ops.kernel_calls(reset=True)
    for _ in range(3):
        method.packed_linear(torch.randn(1, 64), p, 64)
    assert len(calls) == 1 and ops.kernel_calls(reset=True) == {"binary_gemm/reference": 3}

"""W(1+1)A(1×4) and activation quantization for every method."""
import pytest
import torch

from qat.errors import QATError
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import QATLinear
from qat.ptq.gptq import gptq
from qat.ptq.initializers import initialize
from qat.quant.grouping import two_level_em


def test_em_never_increases_its_weighted_objective():
    gen = torch.Generator().manual_seed(0)
    mag = torch.randn(16, 300, generator=gen).abs()
    h = torch.rand(300, generator=gen) * 3
    for weight in (None, h):
        bits, levels, history = two_level_em(mag, weight, iters=15)
        for before, after in zip(history, history[1:]):
            assert bool((after <= before * (1 + 1e-12)).all())
        assert bool((levels[:, 0] <= levels[:, 1]).all())
        assert history[-1].sum() < history[0].sum()


def test_em_starts_from_the_magnitude_quartiles():
    """methods.md §6: the EM starts from magnitude quantiles. After one iteration the bits are
    |w| > the midpoint of the row's 1/4 and 3/4 quantiles and each level is the h-weighted mean
    of its members (a skewed row, where that midpoint is far from the mean it used to split at)."""
    mag = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 10.0],
                        [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]])
    h = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    q = torch.quantile(mag, torch.tensor([0.25, 0.75]), dim=1).t()  # [rows, 2]
    split = mag > q.mean(dim=1, keepdim=True)
    assert split[0].tolist() == [False] * 4 + [True] * 4  # (0.325 + 0.625) / 2: not the mean 1.6
    for weight in (None, h):
        bits, levels, _ = two_level_em(mag, weight, iters=1)
        assert torch.equal(bits, split)
        hw = torch.ones(8) if weight is None else weight
        for k, member in enumerate((~split, split)):
            want = (hw * mag * member).sum(1) / (hw * member).sum(1)
            torch.testing.assert_close(levels[:, k], want)


def test_em_stops_when_no_assignment_changes():
    """Iterating past a fixed point changes nothing: the result of em_iters=50 is that of the
    first iteration whose assignment repeats, and the history stops there."""
    gen = torch.Generator().manual_seed(3)
    mag = torch.randn(8, 200, generator=gen).abs()
    bits, levels, history = two_level_em(mag, None, iters=50)
    assert len(history) < 50
    again, levels_again, _ = two_level_em(mag, None, iters=len(history))
    assert torch.equal(bits, again) and torch.equal(levels, levels_again)


def test_one_group_is_rtn_binary():
    w = torch.randn(8, 64)
    method = build_method("w11a14", groups=1, act_bits=16)
    state = method.init_state(w)
    rtn = build_method("rtn_binary")
    buffers = {k: v for k, v in rtn.init_state(w).items() if k != "latent"}
    assert torch.equal(method.fake_quant(state["latent"], {"group_ids": state["group_ids"]}), rtn.fake_quant(w, buffers))


def int4_per_token_oracle(x, c):
    """Per-token asymmetric INT4 written out: the token's range [min(x, 0), max(x, 0)] shrunk by
    the clip c, s = range / 15, z = round(-lo / s), q = clamp(round(x / s) + z, 0, 15).
    Returns (s·(q − z), the entries that were not clamped)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0) * c
    hi = x.amax(-1, keepdim=True).clamp(min=0) * c
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    r = torch.round(x / s) + z
    return s * (r.clamp(0, 15) - z), (r >= 0) & (r <= 15)


def test_activation_quantization_is_per_token_int4_and_its_clip_gradient_is_the_ste_one():
    torch.manual_seed(0)
    method = build_method("pbllm_qat", salient_ratio=0.1, act_bits=4)
    lin = torch.nn.Linear(64, 16)
    q = QATLinear(64, 16, method, method.init_state(lin.weight.detach()), lin.bias.detach().clone())
    fp_method = build_method("pbllm_qat", salient_ratio=0.1)
    fp = QATLinear(64, 16, fp_method, fp_method.init_state(lin.weight.detach()), lin.bias.detach().clone())
    x = torch.randn(5, 64) * torch.linspace(0.2, 3, 5)[:, None]  # tokens of different ranges
    x[1] = x[1].abs()  # a token of one sign: its range is widened to 0 (z = 0)
    c = torch.sigmoid(torch.tensor(4.0))  # the clip at the start
    assert q.act_clip.item() == 4.0
    xq, inside = int4_per_token_oracle(x, c)
    assert not inside.all()  # the clip < 1 clamps each token's extremes
    y = q(x)
    with torch.no_grad():
        torch.testing.assert_close(y, fp(xq), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y, fp(x), rtol=1e-3, atol=1e-3)
    # d(sum y²)/d logit through the rounding STE: dx̂/dc = (x̂ − x)/c inside the grid, x̂/c where
    # clamped (the zero point −lo/s does not depend on c), dc/dlogit = c(1 − c)
    xr = xq.clone().requires_grad_(True)
    fp(xr).pow(2).sum().backward()  # dL/dx̂ through the (fixed) weights
    want = ((xr.grad * (xq - x * inside)).sum() * (1 - c)).item()
    y.pow(2).sum().backward()
    assert q.act_clip.grad.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("block", [0, 64])
def test_gptq_hand_over_is_exact(block):
    torch.manual_seed(0)
    W = torch.randn(32, 256) * 0.02
    X = torch.randn(512, 256) * torch.linspace(0.1, 3, 256)
    H = 2 * X.t() @ X / X.shape[0]
    method = build_method("w11a14", block=block)
    quantizer = method.gptq_quantizer(W, torch.ones(256), 64, hdiag=torch.diag(H))
    result = gptq(W, H, quantizer, block_size=64)
    state = method.state_from_gptq(result, quantizer.record())
    assert torch.equal(method.fake_quant(state["latent"], {"group_ids": state["group_ids"]}), result.quantized)


@pytest.mark.parametrize("block", [0, 64])
def test_gptq_levels_are_the_hessian_weighted_means_of_their_members(block):
    """methods.md §6's M-step at the EM's fixed point: each of a row (row-block)'s two levels is
    the diag(H)-weighted mean |w| of its members, the weights nearer to it; without a Hessian
    (data-free) the plain mean. Both computed here from the levels the quantizer fixed."""
    torch.manual_seed(0)
    W = torch.randn(32, 256) * 0.02
    hdiag = 2 * torch.linspace(0.1, 3, 256) ** 2  # diag(H) of inputs with these scales
    nb = 256 // block if block else 1
    mag = W.abs().double().reshape(32, nb, -1)

    def check(levels, h):
        """levels [32, nb·2] (fp16 values) against the h-weighted means of their members. The
        members are |w| above the levels' midpoint; a weight within fp16 rounding of it may go
        either way (the EM split at the unrounded midpoint): both choices are tried."""
        lv = levels.double().reshape(32, nb, 2)
        mid, tol = lv.mean(-1, keepdim=True), lv.amax(-1, keepdim=True) * 2**-11  # fp16: half an ulp
        h = h.double().reshape(nb, -1)
        match = torch.zeros(32, nb, dtype=torch.bool)
        for upper in (mag > mid - tol, mag > mid + tol):
            want = torch.stack([(h * mag * m).sum(-1) / (h * m).sum(-1) for m in (~upper, upper)], -1)
            match |= ((lv - want.half().double()).abs() <= 1e-3 * want).all(-1)
        assert match.all(), (~match).nonzero()
        return lv

    method = build_method("w11a14", block=block, em_iters=100)
    lv = check(method.gptq_quantizer(W, torch.ones(256), 64, hdiag=hdiag).record().levels, hdiag)
    lv_plain = check(method.gptq_quantizer(W, torch.ones(256), 64, hdiag=None).record().levels, torch.ones(256))
    assert (lv - lv_plain).abs().amax() > 0.05 * lv.abs().amax()  # the weighting matters here


def test_row_blocks_have_their_own_two_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 128) * torch.linspace(0.1, 4, 128)  # blocks of very different magnitude
    whole, blocks = build_method("w11a14", act_bits=16), build_method("w11a14", block=32, act_bits=16)
    ids = blocks.init_state(w)["group_ids"].long()
    assert ids.max() == 7 and torch.equal(ids // 2, (torch.arange(128) // 32).expand(8, -1))
    scales = blocks.scales(w, ids)
    assert scales.shape == (8, 8)
    members = ids[0] == 5  # row 0, block 2, upper level: the mean |w| of its members
    assert scales[0, 5].item() == pytest.approx(w[0, members].abs().mean().item(), rel=1e-3)
    err = {name: (m.fake_quant(w, {"group_ids": m.init_state(w)["group_ids"]}) - w).pow(2).sum().item()
           for name, m in (("whole", whole), ("blocks", blocks))}
    assert err["blocks"] < err["whole"]


def test_calibration_sees_the_quantized_activations():
    calib = torch.randint(0, 257, (4, 32))
    states = {}
    for bits in (4, 16):
        method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric="hessian", act_bits=bits)
        states[bits] = initialize(tiny_llama({}), method, "gptq_hessian", ["lm_head"], calib,
                                  {"true_sequential": False}).states
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(states[4][name]["latent"], states[16][name]["latent"])


@pytest.mark.parametrize("params,needle", [
    (dict(groups=3), "method.groups=3: W(1+1) has 1 or 2 scales per row"),
    (dict(em_iters=-1), "method.em_iters=-1: must be an integer >= 1"),
    (dict(em_iters=0), "method.em_iters=0: must be an integer >= 1"),  # it silently ran one iteration
    (dict(act_bits=5), "unknown method.act_bits 5; allowed: 4, 8, 16"),
    (dict(scope="matrix"), "unknown method.scope 'matrix'; allowed: row"),
    (dict(block=48), "method.block=48: must be 0 (whole rows) or a positive multiple of 32"),
])
def test_bad_settings_are_clear_errors(params, needle):
    with pytest.raises(QATError) as e:
        build_method("w11a14", **params)
    assert needle in str(e.value)


def test_a_block_that_does_not_divide_a_layer_is_a_clear_error():
    method = build_method("w11a14", block=64)
    with pytest.raises(QATError, match="method.block=64 does not divide layers.0.mlp.down_proj's in_features=96"):
        method.check_layer("layers.0.mlp.down_proj", 8, 96, None)
    with pytest.raises(QATError, match="would need 512 scales per row"):
        build_method("w11a14", block=32).check_layer("big", 8, 8192, None)


@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_storage_bits_are_signs_group_bits_and_scales_only(act_bits):
    """8 x 64 layer, blocks of 32: the stored tensors are the sign plane, the group plane, 2 fp16
    scales per row-block (and the fp32 activation clip below 16 bits); the zero-point term
    Σ ŵ per row-block is derived from them, never stored (it was an fp32 tensor: +1 bit per weight)."""
    from qat.nn import PackedLinear, bits_report, convert

    method = build_method("w11a14", block=32, act_bits=act_bits)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 8, bias=False)
    model = torch.nn.Sequential(QATLinear(64, 8, method, method.init_state(lin.weight.detach()), None))
    x = torch.randn(3, 64)
    with torch.no_grad():
        fake = model(x)
        convert(model)
        packed = model(x)
    p = model[0]
    assert isinstance(p, PackedLinear) and "wsum" not in p.packed()
    signs, group_plane, scales, clip = 8 * 2 * 32, 8 * 2 * 32, 8 * 4 * 16, 32 if act_bits < 16 else 0
    assert p.storage_bits() == signs + group_plane + scales + clip
    assert bits_report(model)["storage"] == pytest.approx(2 + (scales + clip) / (8 * 64))
    torch.testing.assert_close(packed, fake, rtol=1e-4, atol=1e-4)


def test_the_derived_zero_point_term_is_the_row_block_sum_of_the_weights():
    """The bit-serial op's Σ_j ŵ_nj per row-block, derived from the stored signs and scales, is
    exactly the sum over the block of the fake-quant weight (the same fp32 values, the same order)."""
    method = build_method("w11a14", block=32)
    torch.manual_seed(1)
    w = torch.randn(6, 96)
    state = method.init_state(w)
    latent = state.pop("latent")
    stored = method.pack(latent, state)
    wsum = method.derived(stored, 96)["wsum"]
    what = method.fake_quant(latent, state).float()
    assert torch.equal(wsum, what.reshape(6, 3, 32).sum(-1))
    assert method.derived(stored | {"wsum": wsum}, 96) == {}  # an old export that stores it: used as is
    assert build_method("w11a14", block=32, act_bits=16).derived(stored, 96) == {}  # not read at 16 bits

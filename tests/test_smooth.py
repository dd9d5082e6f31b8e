"""Smoothing: factors moved from the inputs into the weights, searched on the quantized error."""
import pytest
import torch

from qat.errors import QATError
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import PackedLinear, QATLinear, convert, prepare
from qat.ptq.initializers import initialize
from qat.ptq.smooth import best_smoothing, smooth_model, smoothing_factors


def outlier_model():
    """The tiny Llama with a few outlier input channels in every linear group, as real LLMs have
    (the fp function is kept: what is scaled up before a linear is scaled down inside it)."""
    model = tiny_llama({})
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17]] *= 40
            layer.self_attn.v_proj.weight[[5, 9]] *= 40
            layer.mlp.up_proj.weight[[2, 30]] *= 40
    return model.eval()


def quantizer(method):
    def quantize(w):
        state = method.init_state(w)
        return method.fake_quant(state.pop("latent"), state)
    return quantize


def test_smoothing_factors_hand_case():
    """s_j = max|x_j|^a / max|W_:j|^(1-a): maxima floored at 1e-5, s clamped to [1e-4, 1e4], fp16."""
    act = torch.tensor([16.0, 1.0, 2.0, 0.0, 1e6])
    wmax = torch.tensor([1.0, 16.0, 1.0, 4.0, 1.0])
    # a = 0.75: 16^0.75 = 8; 1 / 16^0.25 = 0.5; 2^0.75 = 1.6818 -> fp16 1.6816; 1e-5^0.75 / 4^0.25 = 1.26e-4
    # -> fp16 1.2600e-4 (subnormal step 6e-8); 1e6^0.75 = 31623 -> 1e4
    want = torch.tensor([8.0, 0.5, 2**0.75, 1e-5**0.75 / 4**0.25, 1e4]).half().float()
    assert smoothing_factors(act, wmax, 0.75).tolist() == want.tolist()
    assert want[2].item() == 1.681640625  # rounded to fp16, not 2^0.75 = 1.68179
    # a = 1: s = max|x| (the 0-activation channel's 1e-5 clamped up to 1e-4); a = 0: s = 1 / max|W|
    assert smoothing_factors(act, wmax, 1.0).tolist() == torch.tensor([16.0, 1.0, 2.0, 1e-4, 1e4]).half().float().tolist()
    assert smoothing_factors(act, wmax, 0.0).tolist() == [1.0, 0.0625, 1.0, 0.25, 1.0]


def test_search_picks_a_strength_that_lowers_the_quantized_output_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, [1, 7]] *= 50  # outlier channels stretch every token's INT4 grid
    w = torch.randn(32, 64, generator=gen) * 0.05
    method = build_method("w11a14")
    strength, s, errors = best_smoothing(x, x.abs().amax(0), [w], [0.25, 0.5, 0.75], quantizer(method), 4)
    assert strength is not None and s.shape == (64,)
    assert errors[f"{strength:g}"] == min(errors.values()) < errors["none"]
    # a strength that only hurts (a = 1 moves all of the activations' range into the binarized
    # weights; no outliers, fp inputs): no smoothing wins, and the layer is left as it is
    strength, s, plain = best_smoothing(x[:, 8:], x[:, 8:].abs().amax(0), [w[:, 8:]], [1.0], quantizer(method), 16)
    assert set(plain) == {"none", "1"} and plain["none"] < plain["1"]
    assert strength is None and s is None


def test_smoothing_keeps_the_fp_model_and_packed_equals_fake_quant():
    model = outlier_model()
    calib = torch.randint(0, 257, (4, 32))
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    method = build_method("w11a14", smooth=True)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    explicit, rows = smooth_model(model, calib, method, ["lm_head"])
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # the fp function is unchanged
    assert any(r["strength"] is not None for r in rows)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)  # folded into the norm
    assert explicit and all(n.endswith(("o_proj", "down_proj")) for n in explicit)

    states = initialize(model, method, "rtn", ["lm_head"]).states
    for name, s in explicit.items():
        states[name]["input_scale"] = s
    prepare(model, method, states)
    layer = model.get_submodule(next(iter(explicit)))
    assert isinstance(layer, QATLinear) and layer.input_scale is not None
    with torch.no_grad():
        fake = model(ids).logits
        convert(model)
        packed = model(ids).logits
    assert isinstance(model.get_submodule(next(iter(explicit))), PackedLinear)
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skipped", ["k_proj", "gate_proj"])
def test_smoothing_with_a_skipped_reader_of_a_norm_keeps_the_fp_model(skipped):
    """A skipped linear that reads a smoothed norm's output sees x/s too: it must get W·s (it stays
    fp, so that is exact), else `quantize.skip=[lm_head,k_proj]` changed the fp model's logits."""
    model = outlier_model()
    calib = torch.randint(0, 257, (4, 32))
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        before = model(ids).logits
    layer0 = model.model.layers[0]
    readers, norm = (layer0.self_attn, layer0.input_layernorm) if skipped == "k_proj" else \
        (layer0.mlp, layer0.post_attention_layernorm)
    skipped_before, norm_before = getattr(readers, skipped).weight.clone(), norm.weight.clone()
    _, rows = smooth_model(model, calib, build_method("w11a14", smooth=True), ["lm_head", skipped])
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # the fp function is unchanged
    assert not torch.equal(norm.weight, norm_before)  # the group was smoothed: 1/s folded into the norm ...
    assert not torch.equal(getattr(readers, skipped).weight, skipped_before)  # ... and s into the skipped reader
    assert all(skipped not in n for r in rows for n in r["linears"])  # which the search leaves out: it stays fp


@pytest.mark.parametrize("params,needle", [
    (dict(smooth="yes"), "method.smooth='yes': must be true or false"),
    (dict(smooth_alphas=[0.5, 1.5]), "method.smooth_alphas=[0.5, 1.5]: must be a non-empty list of numbers in [0, 1]"),
    (dict(smooth_alphas=[]), "method.smooth_alphas=[]: must be a non-empty list"),
])
def test_bad_smoothing_settings_are_clear_errors(params, needle):
    with pytest.raises(QATError) as e:
        build_method("gptq", bits=2, **params)
    assert needle in str(e.value)


def test_binary_column_factors_recover_a_row_times_column_scaled_sign_matrix():
    """W = diag(a)·B·diag(c) exactly: the factors are 1/c (up to the fp16 rounding and the mean-1
    normalisation), and W·s is then one scale per row times signs."""
    from qat.ptq.smooth import binary_column_factors

    g = torch.Generator().manual_seed(0)
    a = torch.rand(12, generator=g) + 0.5
    c = torch.rand(40, generator=g) * 3 + 0.2
    B = torch.where(torch.rand(12, 40, generator=g) < 0.5, -1.0, 1.0)
    W = a[:, None] * B * c[None, :]
    s = binary_column_factors([W[:5], W[5:]])  # two linears reading the same input: stacked rows
    torch.testing.assert_close(s, (c.mean() / c).half().float(), rtol=2e-3, atol=0)
    Ws = W * s
    row_scale = Ws.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(Ws, row_scale * B, rtol=2e-3, atol=0)

"""Methods on QATLinear / PackedLinear: equality of the two forms, frozen salient values, bits."""
import pytest
import torch

from qat.errors import QATError
from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import PackedLinear, QATLinear, bits_report, convert, prepare
from qat.ptq.initializers import initialize
from qat.quant.binarize import expand_groups, optimal_alpha


def layer(method, out_f=8, in_f=64, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    state = method.init_state(lin.weight.detach())
    return QATLinear(in_f, out_f, method, state, lin.bias.detach().clone())


@pytest.mark.parametrize("params", [
    dict(name="rtn_binary"),
    dict(name="pbllm_qat", salient_ratio=0.1),
    dict(name="pbllm_qat", salient_ratio=0.02, group_size=32),   # CSR positions
    dict(name="pbllm_qat", salient_ratio=0.3, salient_bits=12),  # wide codes (12 bits each, back to back)
    dict(name="pbllm_qat", salient_ratio=0.1, salient_bits=4),   # k-bit codes packed, unpacked once per layer
    dict(name="pbllm_qat", salient_ratio=0.02, salient_bits=3, group_size=32),  # ... with CSR positions
    dict(name="dyngroup", groups=1, scope="matrix"),
    dict(name="dyngroup", groups=2, scope="row"),
    dict(name="dyngroup", groups=5, algorithm="greedy"),     # not a power of two: 3 id planes
    dict(name="dyngroup", groups=16, window=8, scope="matrix"),
    dict(name="w11a14"),                                     # W(1+1)A(1x4): the bit-serial path
    dict(name="w11a14", groups=1),
    dict(name="w11a14", block=32),                           # two scales per row-block
    dict(name="w11a14", block=32, act_bits=16),
    dict(name="w11a14", act_bits=8),
    dict(name="w11a14", act_bits=16),
    dict(name="pbllm_qat", salient_ratio=0.1, act_bits=4),   # any method with INT4 inputs
    dict(name="gptq", bits=2, group_size=32, act_bits=4),
    dict(name="fp16", act_bits=4),                           # W16A4: the activation error alone
])
def test_packed_model_equals_fake_quant_model(params):
    method = build_method(**params)
    model = tiny_llama({})
    x = torch.randint(0, 257, (2, 40))
    prepare(model, method, initialize(model, method, "rtn", ["lm_head"]).states)
    with torch.no_grad():
        fake = model(x).logits
        convert(model)
        packed = model(x).logits
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    torch.testing.assert_close(packed, fake, rtol=1e-4, atol=1e-4)  # (INT4 bit planes: fp32 sums in another order)


def test_salient_values_frozen_through_optimizer_steps_with_weight_decay():
    method = build_method("pbllm_qat", salient_ratio=0.2)
    q = layer(method)
    mask = q.salient_mask.clone()
    before = q.quantized_weight().detach()[mask].clone()
    opt = torch.optim.AdamW(q.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(5):
        opt.zero_grad()
        q(torch.randn(16, 64)).pow(2).sum().backward()
        assert q.weight.grad[mask].abs().sum() == 0  # no gradient reaches salient latents
        opt.step()
    after = q.quantized_weight().detach()
    assert torch.equal(after[mask], before)  # bit for bit
    assert not torch.equal(after[~mask], layer(method).quantized_weight().detach()[~mask])  # the rest trained
    assert not any(n.startswith("salient") for n, _ in q.named_parameters())


def test_alpha_recomputed_from_latent_each_forward():
    method = build_method("pbllm_qat", salient_ratio=0.1)
    q = layer(method)
    with torch.no_grad():
        q.weight.mul_(2.0)
        w = q.quantized_weight()
    keep = ~q.salient_mask
    expected = (q.weight.abs() * keep).sum(1) / keep.sum(1)
    torch.testing.assert_close(w.abs().where(keep, 0).amax(1), expected.half().float())


def test_storage_bits_hand_case():
    """8 x 64 layer, r = 0.1 -> round(51.2) = 51 salient; bitmap is cheaper than CSR here."""
    method = build_method("pbllm_qat", salient_ratio=0.1)
    q = layer(method)
    model = torch.nn.Sequential(q)
    convert(model)
    p = model[0]
    n, nnz = 8 * 64, 51
    signs, scales = 8 * 2 * 32, 8 * 16
    salient = nnz * 8 + 8 * 16 * 2  # codes + per-row fp16 scale and zero
    bitmap, csr = 8 * 2 * 32, nnz * 16 + 8 * 16  # CSR: a uint16 column per entry + a uint16 count per row
    fmt = 8  # the bitmap's row counts are its popcounts: no row pointers stored (derived for the kernels)
    assert bitmap < csr
    assert "salient_row_ptr" not in p.packed() and "salient_row_ptr" in p.kernel_tensors()
    assert p.storage_bits() == signs + scales + salient + bitmap + fmt
    rep = bits_report(model)
    assert rep["storage"] == pytest.approx(p.storage_bits() / n)
    assert rep["weight"] == pytest.approx(((n - nnz) + nnz * 8 + scales + 8 * 32) / n)


@pytest.mark.parametrize("k", [2, 3, 4, 7, 12])
def test_salient_codes_below_8_bits_store_k_bits(k):
    """The same 8 x 64 layer with k-bit salient codes: the 51 codes are stored back to back,
    ceil(51·k / 32) int32 words, instead of a byte (or an int16) each; bits.weight stays the
    paper's count and bits.storage is every stored byte."""
    method = build_method("pbllm_qat", salient_ratio=0.1, salient_bits=k)
    model = torch.nn.Sequential(layer(method))
    x = torch.randn(3, 64)
    with torch.no_grad():
        fake = model(x)
        convert(model)
        packed = model(x)
    p = model[0]
    n, nnz = 8 * 64, 51
    signs, scales, scale_zero = 8 * 2 * 32, 8 * 16, 8 * 16 * 2
    bitmap, fmt = 8 * 2 * 32, 8
    codes = -(-nnz * k // 32) * 32
    assert p.storage_bits() == signs + scales + codes + scale_zero + bitmap + fmt
    assert p.storage_bits() < signs + scales + nnz * (8 if k <= 8 else 16) + scale_zero + bitmap + fmt
    rep = bits_report(model)
    assert rep["storage"] == pytest.approx(p.storage_bits() / n)
    assert rep["weight"] == pytest.approx(((n - nnz) + nnz * k + scales + scale_zero) / n)
    torch.testing.assert_close(packed, fake, rtol=1e-5, atol=1e-5)


def test_rtn_binary_weight_bits_are_one_plus_scales():
    model = torch.nn.Sequential(layer(build_method("rtn_binary"), 8, 64))
    convert(model)
    assert bits_report(model)["weight"] == pytest.approx(1 + 16 / 64)


@pytest.mark.parametrize("params,needle", [
    (dict(name="nope"), "unknown method 'nope'"),
    (dict(name="pbllm_qat", salient_ratio=1.0), "salient_ratio=1.0 is outside [0.0, 1.0)"),
    (dict(name="pbllm_qat", salient_ratio=-0.1), "salient_ratio=-0.1"),
    (dict(name="pbllm_qat", salient_bits=1), "salient_bits=1 is outside 2..16"),
    (dict(name="pbllm_qat", salient_bits=17), "salient_bits=17"),
    (dict(name="pbllm_qat", salient_metric="random"), "unknown salient_metric 'random'"),
    (dict(name="pbllm_qat", bogus=1), "bad parameters for method 'pbllm_qat'"),
])
def test_bad_method_settings_are_clear_errors(params, needle):
    with pytest.raises(QATError) as e:
        build_method(**params)
    assert needle in str(e.value)


def test_the_data_free_seed_of_pbllm_ranks_by_magnitude_and_takes_mean_abs_alpha():
    """init=rtn (and layers without Hessians) cannot use calibration data: hessian saliency and
    arb_x fall back to |w| and alpha = mean|w| (initialize logs the changed settings)."""
    method = build_method("pbllm_qat", salient_metric="hessian", binarizer="arb_x")
    data_free = method.data_free()
    assert (data_free.salient_metric, data_free.binarizer) == ("magnitude", "sign")
    assert data_free.salient_ratio == method.salient_ratio and data_free != method


def test_hessian_saliency_without_hessians_is_a_clear_error():
    method = build_method("pbllm_qat", salient_metric="hessian")
    with pytest.raises(QATError, match="init=gptq_hessian"):
        method.init_state(torch.randn(4, 8))


def test_derived_tensors_follow_the_stored_ones():
    """PackedLinear caches what the method derives from its stored tensors (W(1+1)A4's zero-point
    sums); loading other stored values in place afterwards must not leave a stale cache."""
    method = build_method("w11a14")
    a, b = torch.nn.Sequential(layer(method, seed=0)), torch.nn.Sequential(layer(method, seed=1))
    convert(a), convert(b)
    x = torch.randn(4, 64)
    with torch.no_grad():
        a(x)  # derives and caches a's sums
        a.load_state_dict(b.state_dict())  # copies b's tensors into a's, in place
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("group_size", [0, 32])
def test_learned_alpha_trains_and_the_packed_layer_stores_it(group_size):
    """method.alpha=learned: alpha is a parameter that starts at the seed's alpha* and moves under
    the optimizer at optim.lr_scale; the latent weights' magnitudes no longer set it; the packed
    layer stores the trained alpha and computes what the training form does."""
    from qat.train.lit import param_groups

    method = build_method("pbllm_qat", salient_ratio=0.1, group_size=group_size, alpha="learned")
    q = layer(method)
    keep = ~q.salient_mask
    assert q.alpha.shape == (8, 1 if group_size == 0 else 2) and "alpha" not in dict(q.named_buffers())
    torch.testing.assert_close(q.alpha, optimal_alpha(q.weight.detach(), keep, group_size).half().float())
    with torch.no_grad():  # the seed's output is unchanged: alpha starts at alpha*
        torch.testing.assert_close(q.quantized_weight(), layer(build_method(
            "pbllm_qat", salient_ratio=0.1, group_size=group_size)).quantized_weight())
    start = q.alpha.detach().clone()
    groups = param_groups(q, {"lr": 1e-3, "lr_scale": 1e-2, "weight_decay": 0.1})
    assert {id(p): g["lr"] for g in groups for p in g["params"]}[id(q.alpha)] == 1e-2
    opt = torch.optim.AdamW(groups)
    x = torch.randn(16, 64)
    for _ in range(3):
        opt.zero_grad()
        (q(x) - 1.0).pow(2).sum().backward()
        assert q.alpha.grad is not None and q.alpha.grad.abs().sum() > 0
        opt.step()
    assert not torch.allclose(q.alpha, start)
    with torch.no_grad():
        q.weight.mul_(3.0)  # magnitudes alone no longer move the scale
        w = q.quantized_weight()
    torch.testing.assert_close(w.abs()[keep], expand_groups(q.alpha.detach(), 64).half().float()[keep])
    model = torch.nn.Sequential(q)
    with torch.no_grad():
        fake = model(x)
        convert(model)
        assert isinstance(model[0], PackedLinear)
        torch.testing.assert_close(model(x), fake, rtol=1e-4, atol=1e-4)


def test_frozen_quantized_weights_are_for_evaluation_only():
    """Inside frozen_quantized_weights the layers multiply with a weight built once on entry: the same
    outputs without gradients; a forward with gradients still fake-quantizes the current latent."""
    from qat.nn import frozen_quantized_weights

    q = layer(build_method("pbllm_qat", salient_ratio=0.1))
    x = torch.randn(4, 64)
    with torch.no_grad():
        plain = q(x)
    with frozen_quantized_weights(q):
        assert q.frozen_weight is not None
        with torch.no_grad():
            assert torch.equal(q(x), plain)
        q(x).sum().backward()
        assert q.weight.grad is not None  # the training path never reads the frozen copy
    assert q.frozen_weight is None


def test_optimizer_groups_never_decay_latent_weights_and_give_clips_their_lr():
    """Weight decay would shrink alpha* = mean |w| of a binarized layer directly: latent weights are
    never decayed; the activation clips train at optim.lr_clip; fp 2-D parameters are decayed."""
    from qat.train.lit import param_groups

    method = build_method("pbllm_qat", salient_ratio=0.1, act_bits=4)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    model[0] = layer(method)
    groups = param_groups(model, {"lr": 1e-3, "lr_fp": 2e-4, "lr_clip": 5e-2, "weight_decay": 0.1})
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert by_id[id(model[0].weight)] == (1e-3, 0.0)
    assert by_id[id(model[0].act_clip)] == (5e-2, 0.0)
    assert by_id[id(model[2].weight)] == (2e-4, 0.1) and by_id[id(model[1].weight)] == (2e-4, 0.0)
    opt = torch.optim.AdamW(groups)
    before = model[0].weight.detach().abs().mean()
    model[0].weight.grad = torch.zeros_like(model[0].weight)  # decay alone would move it
    opt.step()
    assert torch.equal(model[0].weight.detach().abs().mean(), before)


def test_methods_import_only_the_pure_packages():
    """qat/methods depends on qat.quant, qat.kernels and qat.errors alone (qat.ptq imports the
    methods, never the other way round): no import cycle, no lazy-import workaround."""
    import ast
    from pathlib import Path

    import qat.methods

    allowed = ("qat.quant", "qat.kernels", "qat.errors", "qat.methods")
    for path in Path(qat.methods.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        bad = [n for n in names if n.split(".")[0] == "qat" and not n.startswith(allowed)]
        assert not bad, f"{path.name} imports {bad}"


def test_training_callbacks_ask_the_method_through_its_hooks():
    """RefreshBuffers copies the method's refresh() into every QATLinear each refresh_every steps
    (dyngroup's regroup_every); QuantHealth leaves the method's frozen_mask (PB-LLM's salient
    weights, stored as codes) out of the sign-flip rate."""
    from types import SimpleNamespace

    from qat.train.callbacks import QuantHealth, RefreshBuffers

    def qat_model(method):
        model = tiny_llama({})
        prepare(model, method, initialize(model, method, "rtn", ["lm_head"]).states)
        return model, [m for m in model.modules() if isinstance(m, QATLinear)]

    step = lambda n: SimpleNamespace(global_step=n)  # noqa: E731
    method = build_method("dyngroup", groups=2, lambda_reg=0.0, regroup_every=2)
    assert method.refresh_every() == 2 and build_method("dyngroup").refresh_every() == 0
    model, layers = qat_model(method)
    with torch.no_grad():
        for q in layers:
            q.weight[q.group_ids.bool()] *= 0.01  # the large-magnitude group shrinks below the rest
    before = [q.group_ids.clone() for q in layers]
    refresh = RefreshBuffers(method.refresh_every())
    refresh.on_train_batch_end(step(1), SimpleNamespace(model=model), None, None, 0)
    assert all(torch.equal(q.group_ids, b) for q, b in zip(layers, before))
    refresh.on_train_batch_end(step(2), SimpleNamespace(model=model), None, None, 0)
    assert all(torch.equal(q.group_ids, method.regroup(q.weight)) for q in layers)
    assert not all(torch.equal(q.group_ids, b) for q, b in zip(layers, before))

    model, layers = qat_model(build_method("pbllm_qat", salient_ratio=0.5))
    logged: dict = {}
    module = SimpleNamespace(model=model, log_dict=logged.update)
    health = QuantHealth(every=1)
    health.on_train_start(None, module)
    with torch.no_grad():
        for q in layers:
            q.weight[q.salient_mask] *= -1
    health.on_train_batch_end(step(1), module, None, None, 0)
    assert logged["quant/sign_flip_rate"] == 0  # only frozen weights flipped
    with torch.no_grad():
        for q in layers:
            q.weight.mul_(-1)
    health.on_train_batch_end(step(2), module, None, None, 0)
    assert logged["quant/sign_flip_rate"] == 1


@pytest.mark.parametrize("bits", [8, 4])  # codes one per byte, and a k-bit code stream (unpacked: derived)
@pytest.mark.parametrize("ratio", [0.05, 0.4])  # CSR (stored row counts) and bitmap (counts = popcounts)
def test_salient_row_pointers_are_derived_and_old_exports_still_run(ratio, bits):
    """The int32 row pointers the kernels read are derived from the stored counts or bitmap; an
    export written before (int32 `salient_row_ptr` stored, no counts) gives the same output."""
    method = build_method("pbllm_qat", salient_ratio=ratio, salient_bits=bits)
    w = torch.randn(24, 96)
    state = method.init_state(w)
    stored = method.pack(state.pop("latent"), state)
    mask = state["salient_mask"]
    want_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)]).to(torch.int32)
    derived = method.derived(stored, 96)
    assert "salient_row_ptr" not in stored and torch.equal(derived["salient_row_ptr"], want_ptr)
    old = {k: v for k, v in stored.items() if k != "salient_row_counts"} | {"salient_row_ptr": want_ptr}
    x = torch.randn(5, 96)
    want = method.packed_linear(x, {**stored, **derived}, 96)  # as PackedLinear hands them
    assert torch.equal(method.packed_linear(x, stored, 96), want)  # derived on the fly: the same tensors
    # the old layout takes another CPU kernel (bitmap, fp16 scales): equal up to fp32 summation order
    torch.testing.assert_close(method.packed_linear(x, old, 96), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("params", [
    dict(salient_ratio=0.1),                           # the headline: uint8 codes
    dict(salient_ratio=0.1, salient_bits=12),          # int32 codes
    dict(salient_ratio=0.0),                           # rtn_binary: no salient part
    dict(salient_ratio=0.1, ste_clip=0.04),            # the clipped STE
    dict(salient_ratio=0.1, alpha="learned"),          # alpha a trained parameter
])
def test_fused_cpu_fake_quant_equals_the_pure_torch_form(params):
    """The C++ training form (qat/kernels/fused.py) against PartialBinary.fake_quant_reference on a
    weight with an outlier column and exact zeros: the same weight bit for bit, the same gradients
    (to the order of one row sum), for the latent weight and a learned alpha."""
    from qat.kernels.fused import fused_extension

    method = build_method("pbllm_qat", **params)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 520, generator=g) * 0.05
    w[:, 3] *= 20
    w[5, :7] = 0.0  # sgn(0) = 0 in alpha*'s gradient, sign(0) = +1 in the weight
    state = method.init_state(w)
    if fused_extension(w, method.group_size) is None:
        pytest.skip("the CPU extension did not build")
    latent = state.pop("latent")
    grad_out = torch.randn(w.shape, generator=g)
    results = []
    for fn in (method.fake_quant, method.fake_quant_reference):
        lat = latent.clone().requires_grad_(True)
        buffers = {k: (v.clone().requires_grad_(True) if k == "alpha" else v) for k, v in state.items()}
        out = fn(lat, buffers)
        out.backward(grad_out)
        results.append((out.detach(), lat.grad, buffers["alpha"].grad if "alpha" in buffers else None))
    (fused, gw, ga), (ref, gw_ref, ga_ref) = results
    assert torch.equal(fused, ref)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-6)
    assert (gw_ref != 0).any()
    if ga_ref is not None:
        torch.testing.assert_close(ga, ga_ref, rtol=1e-5, atol=1e-5)

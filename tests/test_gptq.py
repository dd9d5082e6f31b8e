"""GPTQ: the blocked lazy-update form equals a plain per-column form; error vs RTN; engine."""
import pytest
import torch

from qat.methods import build_method
from qat.methods.kbit import KBitQuantizer
from qat.methods.pbllm import PartialBinaryQuantizer
from qat.models.load import tiny_llama
from qat.nn import convert, prepare
from qat.ptq.gptq import (
    gptq,
    inverse_hessian_factor,
    prepare_hessian,
    saliency_denominator,
)
from qat.ptq.initializers import initialize
from qat.quant.binarize import expand_groups, optimal_alpha, refit_alpha_to_hessian


def without_dead_inputs(W, H):
    """The paper's treatment of dead inputs (H_jj = 0): H_jj = 1 and W[:, j] = 0 (float64 copies)."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.nonzero(H.diagonal() == 0).flatten()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def reference_hinv_factor(H, percdamp=0.01):
    """U, the upper Cholesky factor of (H + λI)^-1 with λ = percdamp·mean(diag H), computed
    directly (float64, an explicit inverse), not by the code under test."""
    H = H.double()
    damped = H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)


def plain_gptq(W, H, quantize, percdamp=0.01):
    """GPTQ as the paper writes it, per column, no blocks, no lazy updates (the independent
    oracle): damp H, invert, upper Cholesky factor U of the inverse; quantize column i, then
    W[:, i:] -= (w_i - q_i) / U_ii ⊗ U[i, i:]."""
    W, H = without_dead_inputs(W, H)
    U = reference_hinv_factor(H, percdamp)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = quantize(W[:, i].float(), i).double()
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q.float()


def minmax_rows(W, bits):
    """Per-row asymmetric min/max grid over the row's range widened to 0, fp16 scale and zero."""
    lo, hi = W.amin(1).clamp(max=0), W.amax(1).clamp(min=0)
    scale = ((hi - lo) / (2**bits - 1)).half().float()
    return scale, torch.round(-lo / scale).clamp(0, 2**bits - 1).half().float()


def random_layer(out_f=24, in_f=160, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    X[:, 7] = 0  # a dead input
    W = torch.randn(out_f, in_f, generator=g)
    return W, 2 / n * X.t() @ X, X


def out_err(W, Q, X):
    return float(((X @ (W - Q).t()) ** 2).sum())


def topk_mask(score, ratio):
    """The round(ratio·n) highest-scoring entries of `score` (n = its size)."""
    k = round(ratio * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.argsort(score.flatten(), descending=True)[:k]] = True
    return mask.view_as(score)


def masked_mean_abs(W, keep, group_size):
    """Per row (group_size 0) or per row and group of columns: mean |w| over the kept entries,
    as an [out, in] tensor (each group's value repeated over its columns)."""
    g = group_size or W.shape[1]
    a = (W.abs() * keep).reshape(W.shape[0], -1, g).sum(-1)
    n = keep.reshape(W.shape[0], -1, g).sum(-1).clamp_min(1)
    return (a / n).repeat_interleave(g, dim=1)


def test_blocked_equals_plain_kbit_per_row():
    W, H, X = random_layer()
    Wp = without_dead_inputs(W, H)[0].float()
    scale, zero = minmax_rows(Wp, 3)

    def q(w, i):
        return (torch.clamp(torch.round(w / scale) + zero, 0, 7) - zero) * scale

    blocked = gptq(W, H, KBitQuantizer(Wp, 3), block_size=32).quantized
    torch.testing.assert_close(blocked, plain_gptq(W, H, q), rtol=1e-4, atol=1e-4)
    rtn = (torch.clamp(torch.round(Wp / scale[:, None]) + zero[:, None], 0, 7) - zero[:, None]) * scale[:, None]
    assert out_err(W, blocked, X) < out_err(W, rtn, X)


@pytest.mark.parametrize("group_size", [0, 32])
def test_blocked_equals_plain_partial_binary(group_size):
    W, H, X = random_layer(seed=1)
    Wp = without_dead_inputs(W, H)[0].float()
    # block = whole matrix: mask and alpha fixed once from the start, as in the plain form
    quantizer = PartialBinaryQuantizer(Wp, 0.1, 8, group_size=group_size, block_size=W.shape[1])
    blocked = gptq(W, H, quantizer, block_size=W.shape[1])
    mask = topk_mask(Wp.abs(), 0.1)
    assert torch.equal(quantizer.record().mask, mask)
    s, z = minmax_rows(Wp, 8)  # salient scale/zero: per row, over the row's initial range
    alpha_full = masked_mean_abs(Wp, ~mask, group_size).half().float()

    def q(w, i):
        sal = (torch.clamp(torch.round(w / s) + z, 0, 255) - z) * s
        return torch.where(mask[:, i], sal, torch.where(w >= 0, alpha_full[:, i], -alpha_full[:, i]))

    torch.testing.assert_close(blocked.quantized, plain_gptq(W, H, q), rtol=1e-4, atol=1e-4)
    rtn = torch.where(mask, (torch.clamp(torch.round(Wp / s[:, None]) + z[:, None], 0, 255) - z[:, None]) * s[:, None],
                      torch.where(Wp >= 0, alpha_full, -alpha_full))
    assert out_err(W, blocked.quantized, X) < out_err(W, rtn, X)
    # every binary entry is exactly +-alpha of its row (group)
    assert torch.equal(blocked.quantized.abs()[~mask], alpha_full[~mask])


@pytest.mark.parametrize("metric", ["magnitude", "hessian"])
@pytest.mark.parametrize("group_size", [0, 16])
def test_pbgptq_mask_is_fixed_per_block_from_the_compensated_weights(metric, group_size):
    """Oracle: each block's weights as GPTQ's error feedback left them when the block starts,
    W0[:, b] − Σ_{k < b's first column} err_k ⊗ U[k, b] (err_k = (w'_k − q_k) / U_kk from the
    result's own compensated and quantized columns, U computed here), and the top-r of that
    block's score. A mask from the fp weights, or from each column's value when it is
    quantized, is a different mask."""
    W, H, X = random_layer(seed=2)
    W0, H0 = without_dead_inputs(W, H)
    U = reference_hinv_factor(H0)
    d = (U**2).sum(0)  # diag(H^-1): the OBS denominator
    method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric=metric, group_size=group_size)
    quantizer = method.gptq_quantizer(W0.float(), d.float(), 32)
    result = gptq(W, H, quantizer, block_size=32)
    err = (result.compensated.double() - result.quantized.double()) / U.diagonal()

    def score(block, cols):
        return block.abs() if metric == "magnitude" else block**2 / d[cols]

    n = W.shape[1]
    oracle, fp_mask, starts = [], [], []
    for i1 in range(0, n, 32):
        cols = slice(i1, i1 + 32)
        start = W0[:, cols] - err[:, :i1] @ U[:i1, cols]
        starts.append(start)
        oracle.append(topk_mask(score(start, cols), 0.1))
        fp_mask.append(topk_mask(score(W0[:, cols], cols), 0.1))
    oracle, fp_mask, start = torch.cat(oracle, 1), torch.cat(fp_mask, 1), torch.cat(starts, 1)
    # the oracle can tell the two apart: compensation has moved the later blocks' masks
    assert torch.equal(oracle[:, :32], fp_mask[:, :32]) and not torch.equal(oracle[:, 32:], fp_mask[:, 32:])
    assert torch.equal(quantizer.record().mask, oracle)
    # alpha: per group, from its block's start (the same weights and mask); per row, up front from
    # the fp weights under the per-block mask rule
    if group_size:
        want = masked_mean_abs(start, ~oracle, group_size)[:, ::group_size]
    else:
        want = masked_mean_abs(W0, ~fp_mask, 0)[:, :1]
    torch.testing.assert_close(quantizer.record().alpha, want.half().float(), rtol=1e-3, atol=0)
    assert out_err(W, result.quantized, X) < out_err(W, rtn_pbllm(method, W0.float()), X)


def rtn_pbllm(method, W):
    """The data-free seed (magnitude mask) of the same method, as the baseline GPTQ must beat."""
    rtn = build_method("pbllm_qat", salient_ratio=method.salient_ratio, group_size=method.group_size)
    return rtn.fake_quant(W, {k: v for k, v in rtn.init_state(W).items() if k != "latent"})


@pytest.fixture(scope="module")
def real_layer():
    """layers.3.mlp.down_proj of the embedded default and its Hessian from 4×128 real tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat.models.load import embedded_default_dir

    path = embedded_default_dir()
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    text = ("The history of the city begins with a small settlement on the river, where traders "
            "exchanged grain, salt and timber. In the following centuries the town grew into a "
            "regional centre of commerce, with a cathedral, a university and a busy harbour. ") * 12
    ids = torch.tensor(tok(text)["input_ids"][:512]).reshape(4, 128)
    lin = model.model.layers[3].mlp.down_proj
    xs = []
    handle = lin.register_forward_hook(lambda _m, inp, _o: xs.append(inp[0].reshape(-1, lin.in_features)))
    with torch.no_grad():
        model(ids)
    handle.remove()
    X = torch.cat(xs)
    return lin.weight.detach().clone(), 2 / X.shape[0] * X.t() @ X


@pytest.mark.slow
@pytest.mark.parametrize("binarizer", ["sign", "arb_x"])
@pytest.mark.parametrize("group_size", [0, 64])
@pytest.mark.parametrize("metric", ["magnitude", "hessian"])
def test_pbgptq_state_fake_quantizes_to_gptqs_own_output(real_layer, metric, group_size, binarizer):
    """The hand-over to QAT: what is evaluated, trained and packed is exactly what GPTQ chose,
    on a real layer (failed before: the state re-derived alpha per row and the salient codes
    from the compensated weights, 34 % worse perplexity than GPTQ's own output)."""
    W, H = real_layer
    Wp, Hp = prepare_hessian(W, H)
    U = inverse_hessian_factor(Hp, 0.01)[0]
    method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric=metric, group_size=group_size,
                          binarizer=binarizer)
    quantizer = method.gptq_quantizer(Wp, saliency_denominator(U, "obs"), 128)
    result = gptq(W, H, quantizer, block_size=128)
    state = method.state_from_gptq(result, quantizer.record())
    buffers = {k: v for k, v in state.items() if k != "latent"}
    assert torch.equal(method.fake_quant(state["latent"], buffers), result.quantized)
    # the latent weights keep GPTQ's signs (and so their magnitudes rank the next sign flips)
    keep = ~state["salient_mask"]
    assert torch.equal((state["latent"] >= 0)[keep], (result.compensated >= 0)[keep])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [0, 32])
def test_arb_x_refit_lowers_the_output_error_and_keeps_gptqs_choices(group_size, act_order):
    """binarizer=arb_x changes only alpha (fp16), after the column loop: the same salient mask,
    values and signs as binarizer=sign, a lower output error on the calibration inputs."""
    W, H, X = random_layer(out_f=24, in_f=128, seed=5)
    Wp, Hp = prepare_hessian(W, H)
    U = inverse_hessian_factor(Hp, 0.01)[0]
    out = {}
    for binarizer in ("sign", "arb_x"):
        method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric="hessian", group_size=group_size,
                              binarizer=binarizer)
        quantizer = method.gptq_quantizer(Wp, saliency_denominator(U, "obs"), 64)
        out[binarizer] = gptq(W, H, quantizer, block_size=64, act_order=act_order and not group_size), quantizer
    (sign, qs), (arb, qa) = out["sign"], out["arb_x"]
    assert torch.equal(qs.mask, qa.mask)
    assert torch.equal(sign.quantized[qs.mask], arb.quantized[qa.mask])
    keep = ~qs.mask
    assert torch.equal(sign.quantized[keep] >= 0, arb.quantized[keep] >= 0)
    assert torch.equal(qa.alpha, qa.alpha.half().float()) and not torch.equal(qa.alpha, qs.alpha)
    assert out_err(Wp, arb.quantized, X) < 0.99 * out_err(Wp, sign.quantized, X)


def test_alpha_refit_is_the_least_squares_solution():
    """refit_alpha_to_hessian against a direct solve: per row b_iᵀHt_i / b_iᵀHb_i with one group;
    with column groups the per-row normal equations (G a = r, G_kl = b_kᵀ H b_l), which its sweeps
    approach from the start value, each sweep lowering the error."""
    g = torch.Generator().manual_seed(1)
    out_f, in_f, group = 6, 48, 16
    X = torch.randn(200, in_f, generator=g, dtype=torch.float64) @ torch.randn(in_f, in_f, generator=g,
                                                                               dtype=torch.float64)
    H = X.t() @ X
    T = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
    B = torch.where(T >= 0, 1.0, -1.0).double()
    B[:, :3] = 0  # entries that carry no binary weight (salient ones)
    start = optimal_alpha(T.abs(), B != 0, group)

    def err(alpha):
        E = T - expand_groups(alpha, in_f) * B
        return float(((E @ H) * E).sum())

    one = refit_alpha_to_hessian(T, B, start[:, :1], H, 0)
    torch.testing.assert_close(one[:, 0], ((B @ H) * T).sum(1) / ((B @ H) * B).sum(1))
    exact = []
    for i in range(out_f):
        Bg = torch.zeros(in_f, in_f // group, dtype=torch.float64)
        for k in range(in_f // group):
            Bg[k * group:(k + 1) * group, k] = B[i, k * group:(k + 1) * group]
        exact.append(torch.linalg.solve(Bg.t() @ H @ Bg, Bg.t() @ H @ T[i]))
    exact = torch.stack(exact)
    errors = [err(start)] + [err(refit_alpha_to_hessian(T, B, start, H, group, sweeps=n)) for n in (1, 2, 50)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    torch.testing.assert_close(refit_alpha_to_hessian(T, B, start, H, group, sweeps=50), exact, rtol=1e-6, atol=1e-9)


def test_saliency_denominators():
    _, H, _ = random_layer(seed=3)
    H = prepare_hessian(torch.zeros(1, H.shape[0]), H)[1]
    U, damp, _ = inverse_hessian_factor(H, 0.01)
    Hd = H + damp * H.diagonal().mean() * torch.eye(H.shape[0])
    Hinv = torch.linalg.inv(Hd)
    torch.testing.assert_close(saliency_denominator(U, "obs"), Hinv.diagonal(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(saliency_denominator(U, "hinv_sq"), Hinv.diagonal() ** 2, rtol=2e-3, atol=1e-8)
    # OBS in GPTQ's order: the inverse of the Hessian of the columns not yet quantized
    j = 40
    torch.testing.assert_close(saliency_denominator(U, "obs_gptq_order")[j],
                               torch.linalg.inv(Hd[j:, j:])[0, 0], rtol=1e-3, atol=1e-6)


def test_cholesky_failure_retries_with_more_damping():
    H = torch.zeros(8, 8)
    H[0, 0] = 1.0
    H[1:, 1:] = -0.05 * torch.eye(7)  # not positive definite at the default damping
    U, damp, retries = inverse_hessian_factor(H, 0.01)
    assert retries > 0 and damp > 0.01 and torch.isfinite(U).all()


@pytest.mark.parametrize("params,init_cfg", [
    (dict(name="pbllm_qat", salient_ratio=0.1), {}),
    (dict(name="pbllm_qat", salient_ratio=0.1, salient_metric="hessian"), {}),
    (dict(name="pbllm_qat", salient_ratio=0.1, salient_metric="hessian", binarizer="arb_x"), {}),
    (dict(name="pbllm_qat", salient_ratio=0.1, binarizer="arb_x", group_size=32), {"true_sequential": False}),
    (dict(name="gptq", bits=3, group_size=32), {})])
def test_engine_states_seed_qat_and_pack(params, init_cfg):
    method = build_method(**params)
    calib = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    seed = initialize(tiny_llama({}), method, "gptq_hessian", ["lm_head"], calib, init_cfg)
    states, errors = seed.states, seed.errors
    assert len(states) == 14  # 7 linears x 2 layers
    assert len(errors) == 14 and all(0 <= e["rel_output_error"] < 1 for e in errors)
    model = tiny_llama({})
    prepare(model, method, states)
    x = calib[:2]
    with torch.no_grad():
        fake = model(x).logits
        convert(model)
        torch.testing.assert_close(model(x).logits, fake, rtol=1e-4, atol=1e-4)


def test_indefinite_hessian_falls_back_to_rtn_for_that_layer_and_is_recorded(monkeypatch):
    """Damping retries exhausted (simulated for the 128-input down projections): the run goes
    on, those layers get the data-free seed, calibration_errors records which."""
    import qat.ptq.gptq as gptq_module
    import qat.ptq.initializers as init_module
    from qat.methods import build_method
    from qat.models.load import tiny_llama
    from qat.ptq.initializers import initialize

    real = gptq_module.inverse_hessian_factor

    def flaky(H, percdamp, max_damp=10.0):
        if H.shape[0] == 128:
            raise torch.linalg.LinAlgError("not positive definite")
        return real(H, percdamp, max_damp)

    monkeypatch.setattr(gptq_module, "inverse_hessian_factor", flaky)
    monkeypatch.setattr(init_module, "inverse_hessian_factor", flaky)
    model = tiny_llama({})
    method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric="hessian")
    calib = torch.randint(0, 257, (4, 32))
    seed = initialize(model, method, "gptq_hessian", ["lm_head"], calib, {"true_sequential": False})
    states, errors = seed.states, seed.errors
    fell_back = {e["layer"] for e in errors if e.get("fallback") == "rtn"}
    down = {n for n in states if n.endswith("mlp.down_proj")}
    assert fell_back == down and down
    assert all(torch.isfinite(states[n]["latent"]).all() for n in states)


def test_one_architecture_table_serves_calibration_and_smoothing():
    """Calibration's groups and smoothing's readers of each norm are the same entries
    (qat.models.arch): an architecture it does not know is one clear error for both."""
    import pytest

    from qat.errors import QATError
    from qat.models.arch import architecture, decoder_layers
    from qat.models.load import tiny_llama

    model = tiny_llama({})
    arch = architecture(model)
    assert [g.norm for g in arch.groups] == ["input_layernorm", None, "post_attention_layernorm", None]
    readers = {n for g in arch.groups for n in g.linears}
    layer_linears = {n for n, m in decoder_layers(model)[1][0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert readers == layer_linears  # every linear of a layer is in exactly one group
    model.config.model_type = "gpt2"
    with pytest.raises(QATError, match="method.smooth=true does not know model_type='gpt2'.*known: llama"):
        architecture(model, "method.smooth=true")


def test_act_order_is_an_init_setting_for_any_method_without_column_groups():
    """GPTQ's column order is set in one place, init.act_order: method.act_order (a field kept so
    that exports written before still load) is an error, a method with scale groups of contiguous
    columns refuses act order, and a per-row one hands GPTQ's act-order output over exactly."""
    from qat.errors import QATError

    with pytest.raises(QATError, match="init.act_order=true"):
        build_method("gptq", act_order=True)
    calib = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    for params in (dict(name="gptq", bits=3, group_size=32), dict(name="pbllm_qat", group_size=32)):
        with pytest.raises(QATError, match="init.act_order=true with a method group_size > 0"):
            initialize(tiny_llama({}), build_method(**params), "gptq_hessian", ["lm_head"], calib,
                       {"act_order": True})
    W, H, _ = random_layer(seed=4)
    Wp = prepare_hessian(W, H)[0]
    for params in (dict(name="gptq", bits=3), dict(name="pbllm_qat", salient_ratio=0.1), dict(name="dyngroup")):
        method = build_method(**params)
        quantizer = method.gptq_quantizer(Wp, torch.ones(W.shape[1]), 32)
        result = gptq(W, H, quantizer, block_size=32, act_order=True)
        state = method.state_from_gptq(result, quantizer.record())
        buffers = {k: v for k, v in state.items() if k != "latent"}
        assert torch.equal(method.fake_quant(state["latent"], buffers), result.quantized), method.name

"""GPTQ: the blocked lazy-update form equals a plain per-column form; error vs RTN; engine."""
import pytest
import torch

from qat.methods import build_method
from qat.models.load import tiny_llama
from qat.nn import convert, prepare
from qat.ptq.gptq import (
    KBitQuantizer,
    PartialBinaryQuantizer,
    gptq,
    inverse_hessian_factor,
    prepare_hessian,
    saliency_denominator,
)
from qat.ptq.initializers import initialize
from qat.quant.kbit import minmax_params
from qat.quant.salient import kbit_row_params, salient_mask_topk


def plain_gptq(W, H, quantize, percdamp=0.01):
    """Written out per column, no blocks: quantize column i, spread its error over the rest."""
    W, H = prepare_hessian(W, H)
    U, _, _ = inverse_hessian_factor(H, percdamp)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        q = quantize(W[:, i], i)
        Q[:, i] = q
        err = (W[:, i] - q) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return Q


def random_layer(out_f=24, in_f=160, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g) * 0.3
    X[:, 7] = 0  # a dead input
    W = torch.randn(out_f, in_f, generator=g)
    return W, 2 / n * X.t() @ X, X


def out_err(W, Q, X):
    return float(((X @ (W - Q).t()) ** 2).sum())


def test_blocked_equals_plain_kbit_per_row():
    W, H, X = random_layer()
    scale, zero = minmax_params(prepare_hessian(W, H)[0], 3)

    def q(w, i):
        return (torch.clamp(torch.round(w / scale) + zero, 0, 7) - zero) * scale

    blocked = gptq(W, H, KBitQuantizer(prepare_hessian(W, H)[0], 3), block_size=32).quantized
    torch.testing.assert_close(blocked, plain_gptq(W, H, q), rtol=1e-4, atol=1e-4)
    Wp = prepare_hessian(W, H)[0]
    rtn = (torch.clamp(torch.round(Wp / scale[:, None]) + zero[:, None], 0, 7) - zero[:, None]) * scale[:, None]
    assert out_err(W, blocked, X) < out_err(W, rtn, X)


def test_blocked_equals_plain_partial_binary():
    W, H, X = random_layer(seed=1)
    Wp = prepare_hessian(W, H)[0]
    mask = salient_mask_topk(Wp.abs(), 0.1)
    s, z = kbit_row_params(Wp, mask, 8)
    # block = whole matrix: mask, scales and alpha fixed once from the start, as in the plain form
    quantizer = PartialBinaryQuantizer(tuple(W.shape), 0.1, 8)
    blocked = gptq(W, H, quantizer, block_size=W.shape[1])
    assert torch.equal(quantizer.mask, mask)
    keep = ~mask
    alpha = ((Wp.abs() * keep).sum(1) / keep.sum(1)).half().float()

    def q(w, i):
        sal = (torch.clamp(torch.round(w / s) + z, 0, 255) - z) * s
        return torch.where(mask[:, i], sal, torch.where(w >= 0, alpha, -alpha))

    torch.testing.assert_close(blocked.quantized, plain_gptq(W, H, q), rtol=1e-4, atol=1e-4)
    rtn = torch.where(mask, (torch.clamp(torch.round(Wp / s[:, None]) + z[:, None], 0, 255) - z[:, None]) * s[:, None],
                      torch.where(Wp >= 0, alpha[:, None], -alpha[:, None]))
    assert out_err(W, blocked.quantized, X) < out_err(W, rtn, X)
    # every binary entry is exactly +-alpha of its row
    assert torch.equal(blocked.quantized.abs()[~mask], alpha[:, None].expand_as(W)[~mask])


@pytest.mark.parametrize("metric", ["magnitude", "hessian"])
def test_pbgptq_mask_is_fixed_per_block_from_the_compensated_weights(metric):
    W, H, X = random_layer(seed=2)
    Wp, Hp = prepare_hessian(W, H)
    U = inverse_hessian_factor(Hp, 0.01)[0]
    method = build_method("pbllm_qat", salient_ratio=0.1, salient_metric=metric)
    quantizer = method.gptq_quantizer(Wp, torch.diag(U))
    result = gptq(W, H, quantizer, block_size=32)
    Wc, mask = result.compensated, quantizer.mask
    for i1 in range(0, W.shape[1], 32):
        m = mask[:, i1:i1 + 32]
        assert int(m.sum()) == round(0.1 * m.numel())
    # after the first block the mask follows the compensated weights, not the fp ones
    assert not torch.equal(mask[:, 32:], salient_mask_topk(Wp[:, 32:].abs(), 0.1))
    if metric == "magnitude":
        # the first block's mask is chosen before any compensation reached it
        assert torch.equal(mask[:, :32], salient_mask_topk(Wp[:, :32].abs(), 0.1))
    state = method.state_from_gptq(result, quantizer)
    # the stored per-row 8-bit salient codes reproduce the compensated salient values to within
    # one step (half a step of rounding, plus the fp16 rounding of the scale and zero point)
    deq = (state["salient_codes"].float() - state["salient_zero"][:, None]) * state["salient_scale"][:, None]
    step = state["salient_scale"][:, None].expand_as(Wc)
    assert ((deq - Wc).abs()[mask] <= step[mask]).all()
    assert out_err(W, result.quantized, X) < out_err(W, method.fake_quant(Wp, state), X)


def test_saliency_denominators():
    _, H, _ = random_layer(seed=3)
    H = prepare_hessian(torch.zeros(1, H.shape[0]), H)[1]
    U, damp, _ = inverse_hessian_factor(H, 0.01)
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(H.shape[0]))
    torch.testing.assert_close(saliency_denominator(U, "diag"), Hinv.diagonal(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(saliency_denominator(U, "cholesky"), torch.diag(U))


def test_cholesky_failure_retries_with_more_damping():
    H = torch.zeros(8, 8)
    H[0, 0] = 1.0
    H[1:, 1:] = -0.05 * torch.eye(7)  # not positive definite at the default damping
    U, damp, retries = inverse_hessian_factor(H, 0.01)
    assert retries > 0 and damp > 0.01 and torch.isfinite(U).all()


@pytest.mark.parametrize("params", [dict(name="pbllm_qat", salient_ratio=0.1),
                                    dict(name="pbllm_qat", salient_ratio=0.1, salient_metric="hessian"),
                                    dict(name="gptq", bits=3, group_size=32)])
def test_engine_states_seed_qat_and_pack(params):
    method = build_method(**params)
    calib = torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    states = initialize(tiny_llama({}), method, "gptq_hessian", ["lm_head"], calib)
    assert len(states) == 14  # 7 linears x 2 layers
    errors = initialize.last_errors
    assert len(errors) == 14 and all(0 <= e["rel_output_error"] < 1 for e in errors)
    model = tiny_llama({})
    prepare(model, method, states)
    x = calib[:2]
    with torch.no_grad():
        fake = model(x).logits
        convert(model)
        torch.testing.assert_close(model(x).logits, fake, rtol=1e-4, atol=1e-4)

"""Pure functions against hand-computed cases."""
import math

import pytest
import torch

from qat.quant.activations import fake_quant_act, quantize_act_per_token
from qat.quant.binarize import binarize_ste, optimal_alpha, rescale_to_alpha, sign_pm1, ste_sign
from qat.quant.salient import dequantize_kbit_rows, quantize_kbit_rows, salient_mask_topk


def test_sign_of_zero_is_plus_one():
    assert sign_pm1(torch.tensor([-2.0, 0.0, 3.0])).tolist() == [-1.0, 1.0, 1.0]


def test_alpha_is_mean_abs_over_non_salient_entries():
    w = torch.tensor([[1.0, -3.0, 10.0, 2.0], [0.5, -0.5, 1.5, -4.0]])
    keep = torch.tensor([[True, True, False, True], [True, True, True, False]])
    alpha = optimal_alpha(w, keep)
    assert alpha[:, 0].tolist() == pytest.approx([(1 + 3 + 2) / 3, (0.5 + 0.5 + 1.5) / 3])
    # per group of 2 columns
    g = optimal_alpha(w, keep, group_size=2)
    torch.testing.assert_close(g, torch.tensor([[2.0, 2.0], [0.5, 1.5]]))


def test_alpha_is_l2_optimal_for_the_sign_pattern():
    w = torch.randn(1, 50)
    a = optimal_alpha(w)[0, 0]
    err = lambda s: float(((w - s * sign_pm1(w)) ** 2).sum())
    assert err(a) <= err(a * 1.01) and err(a) <= err(a * 0.99)


def test_ste_gradient_inside_and_outside_clip():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    ste_sign(w).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert w.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]  # plain STE: identity
    w.grad = None
    ste_sign(w, clip=1.0).backward(torch.ones(5))
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # zero beyond |w| > 1


def test_binarize_keeps_fp16_scale_and_routes_gradient():
    w = torch.tensor([[0.3, -0.1, 0.2]], requires_grad=True)
    wq, alpha = binarize_ste(w)
    a = torch.tensor(0.2).half().float()
    torch.testing.assert_close(wq.detach()[0], torch.stack([a, -a, a]))
    wq.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.333])
def test_salient_count_is_round_r_n(ratio):
    score = torch.randn(37, 53).abs()
    mask = salient_mask_topk(score, ratio)
    assert int(mask.sum()) == round(ratio * 37 * 53)
    if mask.any():
        assert score[mask].min() >= score[~mask].max()


def test_kbit_quantization_hand_case():
    w = torch.tensor([[0.0, 1.0, 3.0, -1.0]])
    mask = torch.tensor([[False, True, True, True]])
    codes, scale, zero = quantize_kbit_rows(w, mask, bits=2)  # 4 levels over [-1, 3]: step 4/3
    step = torch.tensor(4 / 3).half().item()  # the scale as stored (fp16)
    assert scale.item() == step and zero.item() == 1  # zero point round(1 / (4/3)) = 1
    # 1 -> code round(0.75) + 1 = 2, 3 -> round(2.25) + 1 = 3, -1 -> round(-0.75) + 1 = 0
    assert codes[mask].tolist() == [2, 3, 0]
    deq = dequantize_kbit_rows(codes, scale, zero)
    assert deq[mask].tolist() == [step, 2 * step, -step]  # the levels 4/3, 8/3, -4/3 (in fp16 steps)
    assert codes[0, 0] == 0  # not salient: no code
    # 8 bits: error below half a step inside the grid's range; at the row's extremes the zero
    # point's rounding (half a step) and the fp16 scale (qmax·2^-11 steps) can leave the value
    # just outside, where clamping costs at most that much more
    for seed in range(20):
        w8 = torch.randn(4, 100, generator=torch.Generator().manual_seed(seed))
        m8 = torch.ones_like(w8, dtype=torch.bool)
        c8, s8, z8 = quantize_kbit_rows(w8, m8, 8)
        err = (dequantize_kbit_rows(c8, s8, z8) - w8).abs()
        lo, hi = (0 - z8[:, None]) * s8[:, None], (255 - z8[:, None]) * s8[:, None]
        inside = (w8 >= lo) & (w8 <= hi)
        assert (err[inside] <= (s8[:, None] * 0.5 + 1e-6).expand_as(err)[inside]).all()
        assert (err <= s8[:, None] * (0.5 + 255 / 2048) + 1e-6).all()
        assert math.isfinite(float(s8.sum()))


@pytest.mark.parametrize("row", [[0.5, 0.7, 1.0], [-0.5, -0.7, -1.0], [0.3]])
def test_salient_kbit_keeps_rows_of_one_sign(row):
    """The range is widened to include 0, not the zero point clamped: same-sign salient values
    keep their order and a lone salient value is not dequantized to 0."""
    w = torch.tensor([row + [0.01] * (4 - len(row))])
    mask = torch.tensor([[True] * len(row) + [False] * (4 - len(row))])
    codes, scale, zero = quantize_kbit_rows(w, mask, bits=8)
    deq = dequantize_kbit_rows(codes, scale, zero)[mask]
    assert (deq - w[mask]).abs().max() <= 1.0 / 255  # half a step of 8 bits over a range <= 2
    assert len(set(deq.tolist())) == len(row)


def test_per_token_activation_quantization_hand_case():
    """x ≈ s·(q − z) per token (row): range [min(x, 0), max(x, 0)], s = range / 15, z = round(-lo/s)."""
    x = torch.tensor([[-1.5, 0.0, 1.0, 6.0],    # s = 7.5/15 = 0.5, z = 3: exact
                      [-1.0, 0.0, 2.0, 3.5],    # s = 0.3, -lo/s = 3.33 -> z = 3; x/s = -3.33, 6.67, 11.67
                      [0.3, 0.6, 1.5, 0.9],     # one sign: lo widened to 0, s = 0.1, z = 0
                      [-3.0, -1.0, -2.0, 0.0],  # lo = -3, hi = 0: s = 0.2, z = 15
                      [0.0, 0.0, 0.0, 0.0]])    # no range: s floored at 1e-8, everything 0
    q, s, z = quantize_act_per_token(x, 4)
    assert s.shape == z.shape == (5, 1)
    torch.testing.assert_close(s[:, 0], torch.tensor([0.5, 0.3, 0.1, 0.2, 1e-8]))
    assert z[:, 0].tolist() == [3, 3, 0, 15, 0]
    assert q.tolist() == [[0, 3, 5, 15], [0, 3, 10, 15], [3, 6, 15, 9], [0, 10, 5, 15], [0, 0, 0, 0]]
    torch.testing.assert_close(fake_quant_act(x, 4), torch.tensor(
        [[-1.5, 0.0, 1.0, 6.0], [-0.9, 0.0, 2.1, 3.6], [0.3, 0.6, 1.5, 0.9], [-3.0, -1.0, -2.0, 0.0], [0.0] * 4]))
    # a clip of 0.5 halves the range, [-0.75, 3]: s = 0.25, z = 3; the ends are clamped to 0 and 15
    q, s, z = quantize_act_per_token(x[:1], 4, clip=0.5)
    assert (s.item(), z.item()) == (0.25, 3.0) and q.tolist() == [[0, 3, 7, 15]]
    assert fake_quant_act(x[:1], 4, 0.5).tolist() == [[-0.75, 0.0, 1.0, 3.0]]
    # 2 bits, leading dims kept: [-1, 2] -> s = 1, z = 1, q = x + 1
    q, s, z = quantize_act_per_token(torch.tensor([[[-1.0, 2.0, 1.0, 0.0]]]), 2)
    assert q.shape == (1, 1, 4) and q.tolist() == [[[0, 3, 2, 1]]] and s.shape == (1, 1, 1)


def test_rescale_to_alpha_hand_case():
    """Each group's binarized entries scaled by alpha / (their mean |w|), signs kept; a group
    whose binarized entries are all 0 gets alpha (+); entries outside keep are left as they are."""
    w = torch.tensor([[1.0, -2.0, 3.0, 10.0],   # per row, the kept mean is 2: factor 4 / 2
                      [0.0, 0.0, -6.0, 2.0]])   # kept mean 0 (all kept entries 0): they become alpha
    keep = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = rescale_to_alpha(w, keep, torch.tensor([[4.0], [0.5]]))
    assert out.tolist() == [[2.0, -4.0, 6.0, 10.0], [0.5, 0.5, -6.0, 2.0]]
    # groups of 2 columns: [1, -3] mean 2 -> alpha 1: x0.5; [0, 0] -> alpha 5; [2, -2] -> alpha 3: x1.5;
    # a group with no kept entry is returned unchanged
    w = torch.tensor([[1.0, -3.0, 0.0, 0.0], [2.0, -2.0, 7.0, -7.0]])
    keep = torch.tensor([[True, True, True, True], [True, True, False, False]])
    out = rescale_to_alpha(w, keep, torch.tensor([[1.0, 5.0], [3.0, 9.0]]), group_size=2)
    assert out.tolist() == [[0.5, -1.5, 5.0, 5.0], [3.0, -3.0, 7.0, -7.0]]


@pytest.mark.parametrize("rows,n,chunk", [(7, 45, 3), (64, 576, 64), (1, 32, 64), (130, 40, 64)])
def test_set_columns_lists_a_bitmap_like_nonzero(rows, n, chunk):
    from qat.quant.packing import pack_bits, set_columns

    mask = torch.rand(rows, n, generator=torch.Generator().manual_seed(rows + n)) < 0.2
    mask[:, -1] = True  # the last column: bit 31 of a word (the sign bit of int32) when n % 32 == 0
    assert torch.equal(set_columns(pack_bits(mask), n, rows_per_chunk=chunk), mask.nonzero()[:, 1])


@pytest.mark.parametrize("rows,n,chunk", [(7, 45, 3), (130, 576, 64)])
def test_row_popcounts_count_a_bitmap_per_row(rows, n, chunk):
    from qat.quant.packing import pack_bits, row_popcounts

    mask = torch.rand(rows, n, generator=torch.Generator().manual_seed(rows)) < 0.3
    mask[:, -1] = True
    assert torch.equal(row_popcounts(pack_bits(mask), rows_per_chunk=chunk), mask.sum(dim=1))

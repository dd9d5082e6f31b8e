"""BiLLM's pure math (arXiv 2402.04291): residual binarization and the two structure searches.

Everything reduces over the last dimension, so a matrix cut into blocks of columns,
[rows, blocks, block], is handled in one call (one mean and one scale per row per block).

  residual_binarize   order-k binarization of the masked entries of each row: each order
                      approximates what the previous ones left, as sign(r - mu)·alpha + mu with
                      mu = mean(r) and alpha = mean|r - mu| over the masked entries
  search_salient_columns   how many of the top `up_lim` columns (by column sum of the score)
                      to binarize twice, by the error of the whole order-2 approximation
  search_break_point  the magnitude that splits the other columns' entries into two groups,
                      each binarized once, among 81 quantiles (0.10 .. 0.90)
  billm_binarize      a block's weights from its salient columns and group bitmap: small and
                      large groups order 1, salient columns order 2 (slots SLOTS)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qat.quant.binarize import sign_pm1

# order of the per-row means / scales of one block: (group, binarization order)
SLOTS = (("small", 1), ("large", 1), ("salient", 1), ("salient", 2))
SALIENT_ORDER = 2
BREAK_QUANTILES = (0.10, 0.90, 81)  # torch.linspace arguments: the break points tried

SignFn = Callable[[Tensor], Tensor]


def round_straight_through(x: Tensor, dtype: torch.dtype | None) -> Tensor:
    """x rounded to `dtype` (what the packed layer stores) with an identity gradient."""
    if dtype is None:
        return x
    return x + (x.to(dtype).to(x.dtype) - x).detach()


@dataclass
class Residual:
    approx: Tensor     # the approximation, 0 outside the mask; shape of x
    means: Tensor      # [..., order]: mu of each order
    scales: Tensor     # [..., order]: alpha of each order
    positive: Tensor   # bool [order, *x.shape]: where each order's sign is +1


def residual_binarize(x: Tensor, mask: Tensor, order: int, sign: SignFn = sign_pm1,
                      scale_dtype: torch.dtype | None = None) -> Residual:
    """Order-`order` residual binarization of the entries of x under `mask`, per row (last dim).

    A row with no masked entry gets mu = alpha = 0. `sign`: torch.sign (0 -> 0, as the released
    code; then such an entry gets mu) or sign_pm1 / an STE sign (0 -> +1: what a sign bit holds).
    `scale_dtype`: mu and alpha are rounded to it (straight-through) before they are used, the
    sign is taken against the unrounded mu."""
    count = mask.sum(dim=-1, keepdim=True).clamp_min(1).to(x.dtype)
    approx = torch.zeros_like(x)
    means, scales, positive = [], [], []
    for _ in range(order):
        residual = torch.where(mask, x - approx, 0.0)
        mu = residual.sum(dim=-1, keepdim=True) / count
        centred = residual - mu
        alpha = torch.where(mask, centred.abs(), 0.0).sum(dim=-1, keepdim=True) / count
        mu_q, alpha_q = round_straight_through(mu, scale_dtype), round_straight_through(alpha, scale_dtype)
        s = sign(centred)
        approx = approx + torch.where(mask, s * alpha_q + mu_q, 0.0)
        means.append(mu_q)
        scales.append(alpha_q)
        positive.append(s > 0)
    return Residual(approx, torch.cat(means, dim=-1), torch.cat(scales, dim=-1), torch.stack(positive))


def mean_squared_error(x: Tensor, approx: Tensor) -> Tensor:
    return torch.mean((x - approx) ** 2)


def column_mask(columns: Tensor, rows: int, width: int) -> Tensor:
    """bool [rows, width], True in the given columns."""
    mask = torch.zeros(width, dtype=torch.bool, device=columns.device)
    mask[columns] = True
    return mask.expand(rows, width)


def search_salient_columns(score: Tensor, target: Tensor, up_lim: int = 50) -> Tensor:
    """bool [cols]: the salient columns of a block. Candidates: the top i columns by the column
    sum of |score|, i = 1 .. up_lim-1 (up_lim at most the block's width); the chosen i minimises
    the mean squared error on `target` of order-2 binarization of the candidate columns plus
    order-2 binarization of the rest (the released code; target = score there). The first
    minimum wins. torch.sign, as released: the search's errors are not stored."""
    rows, width = target.shape
    column_score = score.abs().sum(dim=0)
    up_lim = min(up_lim, width)
    top = torch.topk(column_score, up_lim).indices
    best_error, best_count = float("inf"), min(1, width)
    for count in range(1, up_lim):
        salient = column_mask(top[:count], rows, width)
        approx = (residual_binarize(target, ~salient, SALIENT_ORDER, torch.sign).approx
                  + residual_binarize(target, salient, SALIENT_ORDER, torch.sign).approx)
        error = float(mean_squared_error(target, approx))
        if error < best_error:
            best_error, best_count = error, count
    return column_mask(torch.topk(column_score, best_count).indices, 1, width)[0]


def split_groups(target: Tensor, salient: Tensor, break_point: Tensor) -> tuple[Tensor, Tensor]:
    """(small, large): the non-salient entries below / at or above the break point in magnitude."""
    magnitude = (target * ~salient).abs()
    return (magnitude < break_point) & ~salient, (magnitude >= break_point) & ~salient


def break_point_candidates(target: Tensor, salient: Tensor) -> Tensor:
    """The 81 quantiles 0.10 .. 0.90 (linear interpolation, as numpy's default) of the block's
    magnitudes with the salient entries counted as zeros (the released code)."""
    q = torch.linspace(*BREAK_QUANTILES, device=target.device, dtype=target.dtype)
    return torch.quantile((target * ~salient).abs().flatten(), q)


def search_break_point(target: Tensor, salient: Tensor, salient_approx: Tensor) -> Tensor:
    """The break point (0-d tensor) whose two order-1 groups, with the salient part's
    approximation `salient_approx`, give the lowest mean squared error on `target`."""
    best_error, best = float("inf"), None
    for candidate in break_point_candidates(target, salient):
        small, large = split_groups(target, salient, candidate)
        approx = (residual_binarize(target, small, 1, torch.sign).approx
                  + residual_binarize(target, large, 1, torch.sign).approx + salient_approx)
        error = float(mean_squared_error(target, approx))
        if error < best_error:
            best_error, best = error, candidate
    return best


def search_block(score: Tensor, target: Tensor, up_lim: int = 50) -> tuple[Tensor, Tensor]:
    """A block's structure: (salient columns bool [cols], large-group bitmap bool [rows, cols],
    False at salient columns). Columns are ranked by `score`, errors measured on `target`."""
    salient_columns = search_salient_columns(score, target, up_lim)
    salient = salient_columns.expand_as(target)
    salient_approx = residual_binarize(target, salient, SALIENT_ORDER, torch.sign).approx
    _, large = split_groups(target, salient, search_break_point(target, salient, salient_approx))
    return salient_columns, large


@dataclass
class BlockBinarization:
    weight: Tensor     # the binarized weights, shape of the input ([rows, blocks, block])
    means: Tensor      # [rows, blocks, 4]: mu per slot (SLOTS)
    scales: Tensor     # [rows, blocks, 4]: alpha per slot
    positive: Tensor   # bool [2, rows, blocks, block]: sign plane of order 1 (every entry), of order 2 (salient)


def billm_binarize(w: Tensor, salient: Tensor, large: Tensor, valid: Tensor | None = None,
                   sign: SignFn = sign_pm1, scale_dtype: torch.dtype | None = torch.float16) -> BlockBinarization:
    """BiLLM's weights for fixed structure: w [rows, blocks, block], salient columns bool
    [blocks, block] (or broadcastable to w), large-group bitmap bool like w, `valid` the columns
    that are not padding (like salient; None: all). Small and large groups: order 1; salient
    entries: order 2; mu and alpha per row per block per slot."""
    salient = salient.expand_as(w)
    other = ~salient if valid is None else ~salient & valid.expand_as(w)
    small, large = other & ~large, other & large
    parts = [residual_binarize(w, small, 1, sign, scale_dtype), residual_binarize(w, large, 1, sign, scale_dtype),
             residual_binarize(w, salient, SALIENT_ORDER, sign, scale_dtype)]
    weight = parts[0].approx + parts[1].approx + parts[2].approx
    first = torch.where(salient, parts[2].positive[0], torch.where(large, parts[1].positive[0], parts[0].positive[0]))
    second = parts[2].positive[1] & salient
    return BlockBinarization(weight, torch.cat([p.means for p in parts], dim=-1),
                             torch.cat([p.scales for p in parts], dim=-1), torch.stack([first, second]))


def to_blocks(x: Tensor, block: int) -> Tensor:
    """[..., cols] -> [..., ceil(cols/block), block], the last block padded with zeros (False)."""
    pad = -x.shape[-1] % block
    if pad:
        x = torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, block)


def from_blocks(x: Tensor, cols: int) -> Tensor:
    """Inverse of to_blocks."""
    return x.reshape(*x.shape[:-2], -1)[..., :cols]

"""Binarization: sign with sign(0)=+1, the L2-optimal scale, and the straight-through estimator."""
from __future__ import annotations

import torch
from torch import Tensor


def sign_pm1(w: Tensor) -> Tensor:
    """sign(w) in {-1, +1}; zero maps to +1 (torch.sign gives 0, which would lose the entry)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


class _STESign(torch.autograd.Function):
    """Forward: sign_pm1. Backward: identity, or identity inside |w| <= clip and 0 outside."""

    @staticmethod
    def forward(ctx, w: Tensor, clip: float | None) -> Tensor:
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(w)
        return sign_pm1(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.clip is None:
            return grad, None
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= ctx.clip).to(grad.dtype), None


def ste_sign(w: Tensor, clip: float | None = None) -> Tensor:
    """sign_pm1 with a straight-through gradient (clipped to |w| <= clip when clip is given)."""
    return _STESign.apply(w, clip)


def group_view(w: Tensor, group_size: int) -> Tensor:
    """[out, in] -> [out, in/group_size, group_size]; group_size 0 means one group per row."""
    out_f, in_f = w.shape
    g = in_f if group_size in (0, None) else group_size
    if in_f % g:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_f}")
    return w.reshape(out_f, in_f // g, g)


def optimal_alpha(w: Tensor, keep: Tensor | None = None, group_size: int = 0) -> Tensor:
    """alpha* = mean|w| over the entries being binarized, per row (or per group of columns).

    `keep` (bool, same shape as w) marks the entries that are binarized; others (salient
    weights) do not enter the mean. Returns [out, n_groups]. A group with no binarized entry
    gets alpha 0 (it holds no binary weight, so the value is never used).
    """
    a = group_view(w.abs(), group_size)
    if keep is None:
        return a.mean(dim=-1)
    k = group_view(keep, group_size)
    return torch.where(k, a, 0.0).sum(dim=-1) / k.sum(dim=-1).clamp_min(1).to(w.dtype)


def expand_groups(per_group: Tensor, in_features: int) -> Tensor:
    """[out, n_groups] -> [out, in_features], each group value repeated over its columns."""
    return per_group.repeat_interleave(in_features // per_group.shape[1], dim=1)


def binarize_ste(
    w: Tensor,
    keep: Tensor | None = None,
    group_size: int = 0,
    clip: float | None = None,
    scale_dtype: torch.dtype | None = torch.float16,
    alpha: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """alpha*·sign(w), sign through the STE, alpha* recomputed analytically from w; or, given
    `alpha` [out, n_groups] (a trained scale), alpha·sign(w): the gradient then reaches alpha
    directly and w only through the STE.

    The scale is rounded to `scale_dtype` (what the packed layer stores) in the forward pass,
    with a straight-through gradient, so the fake-quant and packed forms agree bit for bit.
    Returns (binarized weight, alpha [out, n_groups]).
    """
    alpha = optimal_alpha(w, keep, group_size) if alpha is None else alpha
    if scale_dtype is not None:
        alpha = alpha + (alpha.to(scale_dtype).to(alpha.dtype) - alpha).detach()
    signs = group_view(ste_sign(w, clip), group_size)  # broadcast alpha over its group, no copy
    return (alpha.unsqueeze(-1) * signs).reshape(w.shape), alpha


def rescale_to_alpha(w: Tensor, keep: Tensor, alpha: Tensor, group_size: int = 0) -> Tensor:
    """w with each group's binarized entries scaled so that optimal_alpha(result) == alpha
    (up to float rounding) and their signs kept: a latent weight that fake-quantizes to
    alpha·sign(w). Groups whose binarized entries are all 0 get alpha itself (sign +1).
    Entries outside `keep` are returned unchanged."""
    current = optimal_alpha(w, keep, group_size)
    factor = torch.where(current > 0, alpha / current.clamp_min(torch.finfo(w.dtype).tiny), torch.ones_like(alpha))
    scaled = w * expand_groups(factor, w.shape[1])
    dead = expand_groups(current == 0, w.shape[1])
    scaled = torch.where(dead, expand_groups(alpha, w.shape[1]), scaled)
    return torch.where(keep, scaled, w)


def refit_alpha_to_hessian(target: Tensor, signs: Tensor, alpha: Tensor, H: Tensor, group_size: int = 0,
                           sweeps: int = 3) -> Tensor:
    """ARB-X's scale step: the alpha minimizing the layer's output error on the calibration inputs,
    tr((T - A∘B) H (T - A∘B)ᵀ) with H = XᵀX, for fixed signs B (±1 on binarized entries, 0 elsewhere)
    and T = `target`, what the binarized entries must carry (the weights minus any fixed part). With
    one group per row the solution is closed-form, alpha_i = b_iᵀ H t_i / b_iᵀ H b_i; with column
    groups, `sweeps` passes of exact per-group updates (block coordinate descent from `alpha`, each
    pass lowering the error). alpha stays positive (a group whose fit is <= 0 keeps its value).
    Returns alpha [out, n_groups]."""
    in_f = target.shape[1]
    g = in_f if group_size in (0, None) else group_size
    alpha = alpha.to(target.dtype, copy=True)
    residual_h = (target - expand_groups(alpha, in_f) * signs) @ H  # (T - A∘B)·H, kept up to date
    for _ in range(1 if g == in_f else sweeps):
        for k in range(in_f // g):
            cols = slice(k * g, (k + 1) * g)
            b = signs[:, cols]
            num = (b * residual_h[:, cols]).sum(1)
            den = ((b @ H[cols, cols]) * b).sum(1)
            new = torch.where(den > 0, alpha[:, k] + num / den.clamp_min(torch.finfo(den.dtype).tiny), alpha[:, k])
            new = torch.where(new > 0, new, alpha[:, k])
            residual_h -= ((new - alpha[:, k])[:, None] * b) @ H[cols, :]
            alpha[:, k] = new
    return alpha

"""GPTQ (methods.md §4): column-by-column quantization with inverse-Hessian error feedback.

`gptq(W, H, quantizer)` is the blocked, lazy-update form of IST-DASLab/gptq. The quantizer is
any object with `begin_block(W_block, cols)` (fix per-block parameters on the current,
already-compensated weights) and `column(w, col) -> q` (quantize one column), or one that
sets `whole_block` and quantizes each block at its start (`quantize_block`, BiLLM).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qat.quant.binarize import optimal_alpha
from qat.quant.kbit import minmax_params
from qat.quant.salient import hessian_saliency, salient_mask_topk

log = logging.getLogger(__name__)


@dataclass
class GPTQResult:
    quantized: Tensor     # Q: [out, in], the dequantized weights
    compensated: Tensor   # W': each column's value right before it was quantized
    hinv_diag: Tensor     # diagonal of the upper Cholesky factor of H^-1 (original column order)
    damp: float           # the damping that made H positive definite
    retries: int = 0
    notes: list[str] = field(default_factory=list)


def prepare_hessian(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0, as the reference does."""
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def inverse_hessian_factor(H: Tensor, percdamp: float, max_damp: float = 10.0) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + λI)^-1, λ = percdamp·mean(diag H); on a Cholesky failure
    retry with 10x the damping (logged), up to max_damp."""
    mean_diag = torch.mean(torch.diag(H))
    retries, damp = 0, percdamp
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    while True:
        try:
            L = torch.linalg.cholesky(H + damp * mean_diag * eye)
            Hinv = torch.cholesky_inverse(L)
            return torch.linalg.cholesky(Hinv, upper=True), damp, retries
        except torch.linalg.LinAlgError:
            if damp * 10 > max_damp:
                raise
            log.warning("Cholesky failed at percdamp=%g; retrying with %g", damp, damp * 10)
            damp *= 10
            retries += 1


SALIENCY_KINDS = ["obs", "obs_gptq_order", "hinv_sq"]


def saliency_denominator(U: Tensor, kind: str = "obs") -> Tensor:
    """d_j of the Hessian saliency w_ij²/d_j, from U = the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU):
    "obs":            [H⁻¹]_jj = Σ_i U_ij², the OBS saliency of removing w_ij alone;
    "obs_gptq_order": U_jj² = [(H_{j:,j:})⁻¹]_jj, OBS given that columns < j are already fixed
                      (GPTQ's own per-column error scale; what PB-LLM's code divides by);
    "hinv_sq":        [H⁻¹]_jj² (not OBS): the default, measured best on the embedded default
                      (PB-GPTQ r=0.1 per row: 843 against 1,289 with "obs"; README ablation)."""
    if kind == "obs":
        return U.pow(2).sum(0)
    if kind == "obs_gptq_order":
        return torch.diag(U).pow(2)
    if kind == "hinv_sq":
        return U.pow(2).sum(0).pow(2)
    raise ValueError(f"saliency kind {kind!r}: allowed {SALIENCY_KINDS}")


class Quantizer:
    # True: the loop calls quantize_block once per block instead of column() per column, with no
    # error feedback between the block's columns (BiLLM); later blocks get the lazy update from
    # the errors quantize_block returns
    whole_block: bool = False

    def quantize_block(self, W1: Tensor, Hinv1: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Quantize a whole block at its start: W1 its current weights, Hinv1 its square of the
        upper Cholesky factor of H⁻¹, cols its original column indices. Returns (Q1, Err1): the
        quantized block and the scaled errors the lazy update spreads over the later columns
        (the column loop's (w - q)/U_jj)."""
        raise NotImplementedError

    def begin_block(self, W: Tensor, i1: int, i2: int, cols: Tensor) -> None:
        """Fix per-block parameters. W is the whole matrix in GPTQ's column order as of this
        block's start (earlier blocks' lazy updates applied); cols = original column indices."""

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        """Quantize the column at position `pos` of GPTQ's order (original index `col`)."""
        raise NotImplementedError


@torch.no_grad()
def gptq(W: Tensor, H: Tensor, quantizer: Quantizer, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False) -> GPTQResult:
    W, H = prepare_hessian(W, H)
    n = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp, retries = inverse_hessian_factor(H, percdamp)
    Q, Wc = torch.zeros_like(W), torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        quantizer.begin_block(W, i1, i2, perm[i1:i2])
        if quantizer.whole_block:
            Q[:, i1:i2], Err1 = quantizer.quantize_block(W1, Hinv1, perm[i1:i2])
            Wc[:, i1:i2] = W1
        else:
            for i in range(i2 - i1):
                w, d = W1[:, i], Hinv1[i, i]
                q = quantizer.column(w, i1 + i, int(perm[i1 + i]))
                Q[:, i1 + i], Wc[:, i1 + i] = q, w
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of all later columns
    hdiag = torch.diag(Hinv)
    if act_order:
        inv = torch.argsort(perm)
        Q, Wc, hdiag = Q[:, inv], Wc[:, inv], hdiag[inv]
    return GPTQResult(Q, Wc, hdiag, damp, retries)


class KBitQuantizer(Quantizer):
    """Asymmetric min/max k-bit per row, or per group of `group_size` columns whose parameters
    are set when the group starts, from the matrix as of the current block's start (as the
    reference does). Columns are in GPTQ's (possibly permuted) order."""

    def __init__(self, W: Tensor, bits: int, group_size: int = 0):
        self.bits, self.group_size = bits, group_size
        out_f, in_f = W.shape
        self.n_groups = 1 if group_size == 0 else in_f // group_size
        self.scale = torch.zeros(out_f, self.n_groups, device=W.device)
        self.zero = torch.zeros(out_f, self.n_groups, device=W.device)
        if group_size == 0:
            self.scale[:, 0], self.zero[:, 0] = minmax_params(W, bits)

    def begin_block(self, W: Tensor, i1: int, i2: int, cols: Tensor) -> None:
        self.W = W

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        g = 0 if self.group_size == 0 else pos // self.group_size
        if self.group_size and pos % self.group_size == 0:
            self.scale[:, g], self.zero[:, g] = minmax_params(self.W[:, pos: pos + self.group_size], self.bits)
        s, z = self.scale[:, g], self.zero[:, g]
        return (torch.clamp(torch.round(w / s) + z, 0, 2**self.bits - 1) - z) * s


def blockwise_topk_mask(score: Tensor, ratio: float, block_size: int) -> Tensor:
    """Top-`ratio` of each block of `block_size` columns (PB-GPTQ's mask granularity)."""
    return torch.cat([salient_mask_topk(score[:, i:i + block_size], ratio)
                      for i in range(0, score.shape[1], block_size)], dim=1)


class PartialBinaryQuantizer(Quantizer):
    """PB-GPTQ (methods.md §2), quantizing with exactly the parameters the training and packed
    forms store, so that the state handed to QAT reproduces GPTQ's output bit for bit:
    - salient mask: top-r of each block by |w| or by w²/d_j (d = `denominator`), chosen when
      the block starts from its current, already compensated weights (it follows the weights
      GPTQ's error feedback has grown, as PB-LLM's code does);
    - salient values: k-bit with one scale/zero per row, fixed up front from the row's range;
    - alpha (fp16): with `group_size` g > 0, one per row and group of g columns, the mean |w|
      of the group's non-salient entries when its block starts (g must divide the block);
      with g = 0, one per row, fixed up front from the non-salient entries of the initial
      weights under the same per-block mask rule."""

    def __init__(self, W: Tensor, ratio: float, bits: int, denominator: Tensor | None = None,
                 group_size: int = 0, block_size: int = 128):
        out_f, in_f = W.shape
        if group_size and (block_size % group_size or in_f % group_size):
            raise ValueError(f"group_size={group_size} must divide the GPTQ block ({block_size}) "
                             f"and in_features ({in_f})")
        self.ratio, self.bits, self.denominator, self.group_size = ratio, bits, denominator, group_size
        self.mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        self.sal_scale, self.sal_zero = minmax_params(W, bits)
        if group_size == 0:
            keep = ~blockwise_topk_mask(self.score(W, torch.arange(in_f, device=W.device)), ratio, block_size)
            self.alpha = ((W.abs() * keep).sum(1) / keep.sum(1).clamp_min(1)).to(torch.float16).float()[:, None]
        else:
            self.alpha = torch.zeros(out_f, in_f // group_size, device=W.device)

    def score(self, block: Tensor, cols: Tensor) -> Tensor:
        return block.abs() if self.denominator is None else hessian_saliency(block, self.denominator[cols])

    def begin_block(self, W: Tensor, i1: int, i2: int, cols: Tensor) -> None:
        block = W[:, i1:i2]
        mask = salient_mask_topk(self.score(block, cols), self.ratio)
        self.mask[:, cols] = mask
        if self.group_size:
            g = self.group_size
            a = optimal_alpha(block, ~mask, g).to(torch.float16).float()
            self.alpha[:, i1 // g: i2 // g] = a  # no act_order with groups: positions are columns

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        alpha = self.alpha[:, 0 if self.group_size == 0 else col // self.group_size]
        binary = torch.where(w >= 0, alpha, -alpha)
        qmax = 2**self.bits - 1
        salient = (torch.clamp(torch.round(w / self.sal_scale) + self.sal_zero, 0, qmax)
                   - self.sal_zero) * self.sal_scale
        return torch.where(self.mask[:, col], salient, binary)


class GroupedBinaryQuantizer(Quantizer):
    """Dynamic grouping inside GPTQ (methods.md §5; none of the published code does this): the
    levels alpha_g (fp16 values, [1 or rows, G], ascending over the first `n_filled` groups of
    each grouping) are fixed up front; each weight goes, when GPTQ reaches its column, to the
    level nearest its compensated |w|, and becomes sign(w)·alpha_g. `ids` records the choice.
    `block` > 0 (W(1+1) per row-block): each block of `block` columns has its own Gb levels,
    levels [rows, blocks·Gb] and n_filled [rows, blocks]; ids then run across blocks (b·Gb + g)."""

    def __init__(self, levels: Tensor, n_filled: Tensor, shape: torch.Size, block: int = 0):
        self.levels = levels
        self.block = block or shape[1]
        n_blocks = shape[1] // self.block
        self.per_block = levels.shape[1] // n_blocks
        self.block_levels = levels.reshape(levels.shape[0], n_blocks, self.per_block)
        # cut j lies between levels j and j+1; none above the last filled group
        mids = (self.block_levels[..., :-1] + self.block_levels[..., 1:]) / 2
        filled = n_filled.reshape(levels.shape[0], n_blocks, 1)
        live = torch.arange(self.per_block - 1, device=levels.device)[None, None, :] < (filled - 1)
        self.cuts = torch.where(live, mids, torch.full_like(mids, float("inf")))
        self.ids = torch.zeros(shape, dtype=torch.long, device=levels.device)

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        b = col // self.block
        cuts = self.cuts[:, b].expand(w.shape[0], -1).contiguous()
        g = torch.searchsorted(cuts, w.abs()[:, None].contiguous(), right=True)
        self.ids[:, col] = g[:, 0] + b * self.per_block
        alpha = torch.gather(self.block_levels[:, b].expand(w.shape[0], -1), 1, g)[:, 0]
        return torch.where(w >= 0, alpha, -alpha)

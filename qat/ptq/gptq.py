"""GPTQ (methods.md §4): column-by-column quantization with inverse-Hessian error feedback.

`gptq(W, H, quantizer)` is the blocked, lazy-update form of IST-DASLab/gptq. The quantizer is
a method's `qat.methods.base.ColumnQuantizer`: `begin_block` fixes per-block parameters on the
current, already-compensated weights, `column` quantizes one column; one that sets `whole_block`
quantizes each block at its start instead (`quantize_block`, BiLLM: no feedback between a block's
columns). The k-bit, PB-GPTQ, grouped-binary and BiLLM quantizers live next to their methods
(qat/methods/kbit.py, pbllm.py, dyngroup.py, billm.py).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from qat.methods.base import ColumnQuantizer, GPTQResult

log = logging.getLogger(__name__)


def prepare_hessian(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Dead inputs (H_jj = 0) get H_jj = 1 and W[:, j] = 0, as the reference does."""
    W, H = W.clone().float(), H.clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def damped_hessian(H: Tensor, percdamp: float) -> Tensor:
    """H + λI with λ = percdamp·mean(diag H): what GPTQ inverts, and the objective it minimizes."""
    return H + percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def inverse_hessian_factor(H: Tensor, percdamp: float, max_damp: float = 10.0) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + λI)^-1, λ = percdamp·mean(diag H); on a Cholesky failure
    retry with 10x the damping (logged), up to max_damp."""
    retries, damp = 0, percdamp
    while True:
        try:
            L = torch.linalg.cholesky(damped_hessian(H, damp))
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


@torch.no_grad()
def gptq(W: Tensor, H: Tensor, quantizer: ColumnQuantizer, block_size: int = 128, percdamp: float = 0.01,
         act_order: bool = False) -> GPTQResult:
    W, H = prepare_hessian(W, H)
    n = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp, retries = inverse_hessian_factor(H, percdamp)
    W0 = W.clone() if quantizer.refits else None  # the loop compensates W in place; refine() fits to W0
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
    if quantizer.refits:
        if act_order:
            W0, H = W0[:, inv], H[inv][:, inv]
        Q = quantizer.refine(Q, W0, damped_hessian(H, damp))
    return GPTQResult(Q, Wc, hdiag, damp, retries)

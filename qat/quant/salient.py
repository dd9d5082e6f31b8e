"""Salient-weight selection and the k-bit quantizer that keeps them."""
from __future__ import annotations

import torch
from torch import Tensor


def salient_count(numel: int, ratio: float) -> int:
    return int(round(ratio * numel))


def salient_mask_topk(score: Tensor, ratio: float) -> Tensor:
    """Element-wise mask of the round(ratio·n) entries of highest score over the whole matrix."""
    k = salient_count(score.numel(), ratio)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(score)


def hessian_saliency(w: Tensor, hinv_diag: Tensor) -> Tensor:
    """OBS saliency w² / [H⁻¹]_jj² (column j's inverse-Hessian diagonal), shape of w."""
    return w.float().pow(2) / hinv_diag.float().pow(2).unsqueeze(0)


def kbit_row_params(w: Tensor, mask: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric min/max scale and zero point over the masked entries, in fp16.

    Returns (scale [out], zero [out]) with dequant = (code - zero) * scale. Scale and zero are
    rounded to fp16 because that is what the packed layer stores.
    """
    big = torch.finfo(torch.float32).max
    wf = w.float()
    lo = torch.where(mask, wf, torch.full_like(wf, big)).amin(dim=1)
    hi = torch.where(mask, wf, torch.full_like(wf, -big)).amax(dim=1)
    empty = ~mask.any(dim=1)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # fp16 holds integers exactly only up to 2048: round the zero point as it will be stored
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.float16).float()
    return scale, zero


def quantize_kbit_rows(w: Tensor, mask: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """k-bit asymmetric per-row quantization of the masked entries.

    Returns (codes int32 in [0, 2^bits-1], zero where not masked; scale [out]; zero [out]).
    """
    scale, zero = kbit_row_params(w, mask, bits)
    codes = torch.clamp(torch.round(w.float() / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
    codes = torch.where(mask, codes, torch.zeros_like(codes)).to(torch.int32)
    return codes, scale, zero


def dequantize_kbit_rows(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (codes.float() - zero[:, None]) * scale[:, None]

"""Salient-weight selection and the k-bit quantizer that keeps them."""
from __future__ import annotations

import torch
from torch import Tensor

from qat.quant.kbit import dequantize_kbit, quantize_kbit, range_params


def salient_count(numel: int, ratio: float) -> int:
    return int(round(ratio * numel))


def salient_mask_topk(score: Tensor, ratio: float) -> Tensor:
    """Element-wise mask of the round(ratio·n) entries of highest score over the whole matrix."""
    k = salient_count(score.numel(), ratio)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(score)


def hessian_saliency(w: Tensor, denominator: Tensor) -> Tensor:
    """Saliency w² / d_j (d_j per column j: see qat.ptq.gptq.saliency_denominator), shape of w."""
    return w.float().pow(2) / denominator.float().unsqueeze(0)


def kbit_row_params(w: Tensor, mask: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row scale and zero over the range of the masked entries (qat.quant.kbit.range_params:
    widened to include 0, fp16 as stored). A row with no masked entry gets scale 1, zero 0.

    Returns (scale [out], zero [out]) with dequant = (code - zero) * scale.
    """
    big = torch.finfo(torch.float32).max
    wf = w.float()
    lo = torch.where(mask, wf, torch.full_like(wf, big)).amin(dim=1).clamp(max=0.0)
    hi = torch.where(mask, wf, torch.full_like(wf, -big)).amax(dim=1).clamp(min=0.0)
    return range_params(lo, hi, bits)


def quantize_kbit_rows(w: Tensor, mask: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """k-bit asymmetric per-row quantization of the masked entries.

    Returns (codes int32 in [0, 2^bits-1], zero where not masked; scale [out]; zero [out]).
    """
    scale, zero = kbit_row_params(w, mask, bits)
    codes = quantize_kbit(w.float(), scale[:, None], zero[:, None], bits)
    codes = torch.where(mask, codes, torch.zeros_like(codes)).to(torch.int32)
    return codes, scale, zero


def dequantize_kbit_rows(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return dequantize_kbit(codes.float(), scale[:, None], zero[:, None])

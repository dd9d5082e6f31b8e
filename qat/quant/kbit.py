"""Uniform k-bit quantization (GPTQ's quantizer): asymmetric min/max, fp16 scale and zero."""
from __future__ import annotations

import torch
from torch import Tensor


def range_params(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Asymmetric scale and zero point for values in [lo, hi], so q = round(w/s) + z.

    The range is first widened to include 0, so the zero point is an integer in [0, qmax] and
    every value of the range is representable (a range of one sign keeps all its values; a
    single value is not collapsed to 0). Scale and zero are rounded to fp16, as stored.
    """
    lo, hi = lo.float().clamp(max=0.0), hi.float().clamp(min=0.0)
    qmax = 2**bits - 1
    scale = ((hi - lo) / qmax).to(torch.float16).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # fp16 holds integers exactly only up to 2048: round the zero point as it will be stored
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.float16).float()
    return scale, zero


def minmax_params(W: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per row of W: scale, zero over the row's range (GPTQ's quantizer)."""
    return range_params(W.float().amin(dim=1), W.float().amax(dim=1), bits)


def round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_kbit(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w, scale/zero [out, n_groups] -> dequantized w, round through the STE."""
    out_f, in_f = w.shape
    g = scale.shape[1]
    wg = w.reshape(out_f, g, in_f // g)
    q = torch.clamp(round_ste(wg / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return ((q - zero[..., None]) * scale[..., None]).reshape(out_f, in_f)


def kbit_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    out_f, in_f = w.shape
    g = scale.shape[1]
    q = torch.round(w.reshape(out_f, g, in_f // g) / scale[..., None]) + zero[..., None]
    return torch.clamp(q, 0, 2**bits - 1).reshape(out_f, in_f).to(torch.int32)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """int codes [out, in] -> int32 [out, ceil(in / per_word)], floor(32/bits) codes per word."""
    per = 32 // bits
    out_f, in_f = codes.shape
    words = (in_f + per - 1) // per
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, words * per - in_f)).reshape(out_f, words, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    packed = (c << shifts).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    per = 32 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int64) * bits
    c = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return c.reshape(packed.shape[0], -1)[:, :in_features]

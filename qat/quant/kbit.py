"""Uniform k-bit quantization (GPTQ's quantizer): asymmetric min/max, fp16 scale and zero.

The one asymmetric k-bit grid of the project: a value w sits at code q = clamp(round(w/s) + z,
0, 2^k − 1) (`quantize_kbit`) and stands for (q − z)·s (`dequantize_kbit`); `range_params` /
`minmax_params` lay the grid on a range. GPTQ's column quantizers, the PB-LLM salient values,
the `gptq` method's training and packed forms, the reference kernels and the activations all
call these two, in this op order, so that every form of a weight is the same float bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qat.quant.packing import pack_bits, unpack_bits


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
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize_kbit(w: Tensor, scale: Tensor, zero: Tensor, bits: int, ste: bool = False) -> Tensor:
    """Codes (as floats) of w on the grid: clamp(round(w / scale) + zero, 0, 2^bits − 1); scale and
    zero broadcast against w. `ste`: the rounding passes gradients straight through."""
    x = w / scale
    return torch.clamp((round_ste(x) if ste else torch.round(x)) + zero, 0, 2**bits - 1)


def dequantize_kbit(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The values codes stand for: (codes − zero)·scale."""
    return (codes - zero) * scale


def fake_quant_kbit(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w, scale/zero [out, n_groups] -> dequantized w, round through the STE."""
    out_f, in_f = w.shape
    g = scale.shape[1]
    s, z = scale[..., None], zero[..., None]
    q = quantize_kbit(w.reshape(out_f, g, in_f // g), s, z, bits, ste=True)
    return dequantize_kbit(q, s, z).reshape(out_f, in_f)


def kbit_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """int32 codes [out, in] of w, scale/zero [out, n_groups]."""
    out_f, in_f = w.shape
    g = scale.shape[1]
    q = quantize_kbit(w.reshape(out_f, g, in_f // g), scale[..., None], zero[..., None], bits)
    return q.reshape(out_f, in_f).to(torch.int32)


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


def pack_code_stream(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes [n] (each < 2^bits) -> int32 [ceil(n·bits / 32)]: the codes' bits back to
    back, LSB first (code i in stream bits i·bits .. i·bits + bits − 1; stream bit t in bit t % 32 of
    word t // 32), so n codes take n·bits bits plus < 32 of padding, whatever `bits` is (pack_codes
    keeps whole codes in a word: 4 codes of 7 bits per int32 store 8 bits each)."""
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int64)
    stream = (codes.reshape(-1).to(torch.int64)[:, None] >> shifts) & 1
    return pack_bits(stream.reshape(-1).bool())


def unpack_code_stream(words: Tensor, bits: int, n: int) -> Tensor:
    """int32 stream -> int64 codes [n] (the inverse of pack_code_stream)."""
    shifts = torch.arange(bits, device=words.device, dtype=torch.int64)
    stream = unpack_bits(words, n * bits).reshape(n, bits).to(torch.int64)
    return (stream << shifts).sum(dim=-1)


# -- symmetric per-row k-bit (the quantized embedding / head; ggml's Q8_0 / Q4_0 hold it exactly) --
INT4_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # int4: fractions of max|w| searched per row (MSE)


def symmetric_row_params(w: Tensor, bits: int) -> Tensor:
    """One fp16 scale per row, codes in [-(2^(k-1)-1), 2^(k-1)-1]. int8: the row's max|w| maps to
    127. int4 (7 levels a side are coarse): the clipping of max|w| with the least squared error
    of the row is searched over INT4_CLIPS."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    amax = w.abs().amax(dim=1).clamp_min(1e-8)
    clips = (1.0,) if bits >= 8 else INT4_CLIPS
    best_scale, best_err = None, None
    for c in clips:
        scale = (amax * c / qmax).to(torch.float16).float().clamp_min(6e-8)
        q = quantize_symmetric(w, scale, bits)
        err = ((q * scale[:, None] - w) ** 2).sum(dim=1)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.where(better, err, best_err)
    return best_scale.to(torch.float16)


def quantize_symmetric(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Codes (as floats) of w [rows, cols] on the grid scale[row]·q, q in [-(2^(k-1)-1), 2^(k-1)-1]."""
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w.float() / scale.float()[:, None]), -qmax, qmax)


def symmetric_row_codes(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """int8 codes [rows, cols] of w on the grid scale[row] · q."""
    return quantize_symmetric(w, scale, bits).to(torch.int8)


def pack_nibbles(codes: Tensor) -> Tensor:
    """int8 codes in [-8, 7], [rows, cols] (cols even) -> uint8 [rows, cols/2]: column 2i in the low
    nibble of byte i, 2i+1 in the high one, each stored as code + 8."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [rows, cols/2] -> int8 codes [rows, cols] (the inverse of pack_nibbles)."""
    lo = (packed & 0xF).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1).to(torch.int8)

"""Activation quantization: per-token asymmetric k-bit (A4 = INT4), and A(1×4), INT4 activations
decomposed into 4 binary planes (methods.md §6).

The clipping factor c in (0, 1] (a learnable logit per layer, c = sigmoid(logit), OmniQuant-style)
shrinks each token's [min, max] range before the grid is laid on it: x ≈ s·(q − z).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from qat.quant.kbit import dequantize_kbit, quantize_kbit, round_ste
from qat.quant.packing import pack_bits

ACT_BITS = (4, 8, 16)       # 16: activations stay as they are
ACT_CLIP_INIT = 4.0         # logit of the clipping factor at the start: sigmoid(4) = 0.982
# the factor itself (calibration, smoothing): a Python float computed without torch — a tensor
# made at import lives on whatever device context the import runs under (transformers builds
# models under a meta-device one, where even reading it back fails); as fp32 it is sigmoid(4)'s value
ACT_CLIP_START = 1.0 / (1.0 + math.exp(-ACT_CLIP_INIT))


def quantize_act_per_token(x: Tensor, bits: int, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of x [..., K]: x ≈ s·(q − z), q in [0, 2^bits − 1] (returned as float through the
    rounding STE, so that s and the clip get gradients). Returns (q, s [..., 1], z [..., 1])."""
    qmax = 2**bits - 1
    xf = x.float()
    lo = xf.amin(dim=-1, keepdim=True).clamp(max=0.0) * clip
    hi = xf.amax(dim=-1, keepdim=True).clamp(min=0.0) * clip
    s = ((hi - lo) / qmax).clamp_min(1e-8)
    z = torch.clamp(round_ste(-lo / s), 0, qmax)
    q = quantize_kbit(xf, s, z, bits, ste=True)
    return q, s, z


def fake_quant_act(x: Tensor, bits: int, clip: Tensor | float = 1.0) -> Tensor:
    """s·(q − z) in x's dtype: the activation the quantized layer really multiplies with."""
    q, s, z = quantize_act_per_token(x, bits, clip)
    return dequantize_kbit(q, s, z).to(x.dtype)


def int4_per_token(x: Tensor, clip: Tensor | float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """x ≈ s·(q − z), q in [0, 15], per row of x [M, K]. Returns (q int32, s [M], z [M])."""
    with torch.no_grad():
        q, s, z = quantize_act_per_token(x, 4, clip)
    return q.to(torch.int32), s[..., 0], z[..., 0]


def bit_planes(q: Tensor) -> Tensor:
    """q int [M, K] in [0, 15] -> packed planes int32 [4, M, ceil(K/32)], q = Σ 2^b·plane_b."""
    return torch.stack([pack_bits(((q >> b) & 1).bool()) for b in range(4)])

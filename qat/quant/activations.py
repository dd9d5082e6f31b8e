"""A(1×4): per-token INT4 activations decomposed into 4 binary planes (methods.md §6)."""
from __future__ import annotations

import torch
from torch import Tensor

from qat.quant.packing import pack_bits


def int4_per_token(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x ≈ s·(q − z), q in [0, 15], per row of x [M, K]. Returns (q int, s [M], z [M])."""
    xf = x.float()
    lo = xf.amin(dim=1).clamp(max=0.0)
    hi = xf.amax(dim=1).clamp(min=0.0)
    s = ((hi - lo) / 15).clamp_min(1e-8)
    z = torch.round(-lo / s).clamp(0, 15)
    q = torch.clamp(torch.round(xf / s[:, None]) + z[:, None], 0, 15).to(torch.int32)
    return q, s, z


def bit_planes(q: Tensor) -> Tensor:
    """q int [M, K] in [0, 15] -> packed planes int32 [4, M, ceil(K/32)], q = Σ 2^b·plane_b."""
    return torch.stack([pack_bits(((q >> b) & 1).bool()) for b in range(4)])

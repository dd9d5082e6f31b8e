"""W(1+1)A(1×4) (methods.md §6): two-scale binary weights, INT4 activations as four binary planes.

Weights: per output row two scales alpha_0 <= alpha_1 and one group bit per weight,
ŵ = sign(w)·alpha_g. The bits and scales come from an EM (Lloyd) loop on |w|, weighted by the
calibration Hessian's diagonal H_jj with init=gptq_hessian (where GPTQ then assigns each weight
to the nearer level from its error-compensated value), unweighted with init=rtn (data-free).
QAT: the group bits are frozen buffers; both alphas are recomputed in every forward as the mean
|w| of their members (the training and packed forms are dynamic grouping's with G = 2 per row).

Activations: per token asymmetric INT4 with a learnable clipping factor (act_bits; 8 and 16 for
ablation). Packed at act_bits = 4, the layer is s·(Σ_b 2^b·Ŵ q_b − z·Ŵ1): the W1A1×4 bit-serial
op over the activation's four bit planes, exact given the INT4 values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qat.errors import QATError, check_choice
from qat.kernels import ops
from qat.methods.base import check_ste_clip
from qat.methods.dyngroup import DynamicGrouping, id_planes
from qat.ptq.gptq import GroupedBinaryQuantizer
from qat.quant.activations import bit_planes, fake_quant_act, int4_per_token
from qat.quant.bits import tensor_bits
from qat.quant.grouping import gather_scales, two_level_em


@dataclass
class TwoScaleBinary(DynamicGrouping):
    name: ClassVar[str] = "w11a14"
    supports_gptq: ClassVar[bool] = True
    packs_activations: ClassVar[bool] = True
    groups: int = 2          # 2: W(1+1); 1: one scale per row (rtn_binary)
    scope: str = "row"
    em_iters: int = 10
    act_bits: int = 4

    def validate(self) -> None:
        if self.groups not in (1, 2):
            raise QATError(f"method.groups={self.groups!r}: W(1+1) has 1 or 2 scales per row")
        if isinstance(self.em_iters, bool) or not isinstance(self.em_iters, int) or self.em_iters < 0:
            raise QATError(f"method.em_iters={self.em_iters!r}: must be an integer >= 0")
        check_choice("method.scope", self.scope, ["row"])
        check_ste_clip(self.ste_clip)

    def em(self, weight: Tensor, hdiag: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(group ids int64 [out, in], levels [out, 2]) from the EM loop."""
        bits, levels, _ = two_level_em(weight.detach().abs().float(), hdiag, self.em_iters)
        if self.groups == 1:
            bits = torch.zeros_like(bits)
        return bits.long(), levels

    def grouping(self, weight: Tensor) -> Tensor:
        return self.em(weight)[0]

    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> GroupedBinaryQuantizer:
        """Levels from the H_jj-weighted EM on the initial weights (fp16), fixed; GPTQ assigns."""
        ids, levels = self.em(weight, hdiag)
        if self.groups == 1:
            levels = (weight.abs().float().mean(1, keepdim=True)).expand(-1, 2).clone()
        n_filled = ids.amax(dim=1) + 1
        return GroupedBinaryQuantizer(levels[:, : self.groups].to(torch.float16).float(), n_filled, weight.shape)

    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        packed = super().pack(latent, buffers)
        # sum_j ŵ_nj: the zero-point term of the bit-serial product
        w = torch.where(latent >= 0, 1.0, -1.0) * gather_scales(packed["scales"].float(), buffers["group_ids"].long())
        packed["wsum"] = w.sum(dim=1)
        return packed

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        clip = packed["act_clip"] if "act_clip" in packed else 1.0
        if self.act_bits != 4:
            if self.act_bits < 16:
                x = fake_quant_act(x, self.act_bits, clip)
            return super().packed_linear(x, packed, in_features)
        lead = x.shape[:-1]
        q, s, z = int4_per_token(x.reshape(-1, in_features), clip)
        scales = packed["scales"]
        if scales.shape[1] == 1:  # the bit-serial op reads two scales per row
            scales = scales.expand(-1, 2).contiguous()
        gbits = packed["group_planes"][0] if packed["group_planes"].shape[0] else packed["signs"].new_empty(0)
        y = ops.w1a1x4_gemm(bit_planes(q), packed["signs"], gbits, scales, packed["wsum"], s, z)
        return y.to(x.dtype).reshape(*lead, -1)

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """W(1+1) counts its group bit: 1 + 1 bits per weight + the two fp16 scales per row."""
        return out_features * in_features * (1 + id_planes(self.groups)) + tensor_bits([packed["scales"]])

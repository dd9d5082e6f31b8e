"""W(1+1)A(1×4) (methods.md §6): two-scale binary weights, INT4 activations as four binary planes.

Weights: per output row (or per row-block of `block` columns) two scales alpha_0 <= alpha_1 and
one group bit per weight,
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

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor

from qat.errors import QATError, check_choice
from qat.kernels import ops
from qat.methods.base import check_ste_clip
from qat.methods.dyngroup import DynamicGrouping, GroupedBinaryQuantizer, id_planes
from qat.quant.activations import bit_planes, fake_quant_act, int4_per_token
from qat.quant.bits import tensor_bits
from qat.quant.grouping import gather_scales, two_level_em
from qat.quant.packing import pack_bits, unpack_bits

MAX_SCALES_PER_ROW = 256  # group ids (block·groups + bit) are uint8 buffers
DYNGROUP_ONLY_KNOBS = ("algorithm", "window", "tail", "lambda_reg", "refine_iters")


def row_block_weight_sums(signs: Tensor, group_planes: Tensor, scales: Tensor, groups: int,
                          in_features: int) -> Tensor:
    """Σ_j ŵ_nj per row-block [out, blocks] from the packed form: ŵ = ±alpha[n, block·groups + bit],
    summed in fp32 over the same values in the same order as the fake-quant weight's block sums."""
    out = signs.shape[0]
    nb = scales.shape[1] // groups
    positive = unpack_bits(signs, in_features)
    bit = (unpack_bits(group_planes[0], in_features).long() if groups == 2
           else torch.zeros(out, in_features, dtype=torch.long, device=signs.device))
    block_index = torch.arange(in_features, device=signs.device) // (in_features // nb)
    w = torch.where(positive, 1.0, -1.0) * gather_scales(scales.float(), block_index[None, :] * groups + bit)
    return w.reshape(out, nb, -1).sum(-1)


@dataclass
class TwoScaleBinary(DynamicGrouping):
    name: ClassVar[str] = "w11a14"
    supports_gptq: ClassVar[bool] = True
    packs_activations: ClassVar[bool] = True
    groups: int = 2          # 2: W(1+1); 1: one scale per row (rtn_binary)
    scope: str = "row"
    block: int = 0           # columns per row-block with its own scales (a multiple of 32; 0: the whole row)
    em_iters: int = 10
    act_bits: int = 4

    def validate(self) -> None:
        # dynamic grouping's knobs (inherited fields) that W(1+1)'s EM never reads (its grouping is the
        # EM; regroup_every re-runs it): one error, not silently ignored
        for knob in DYNGROUP_ONLY_KNOBS:
            default = next(f.default for f in fields(DynamicGrouping) if f.name == knob)
            if getattr(self, knob) != default:
                raise QATError(f"method.{knob}={getattr(self, knob)!r}: not a knob of method=w11a14 (its two "
                               "levels per row come from the EM: method.em_iters); it is method=dyngroup's")
        if self.groups not in (1, 2):
            raise QATError(f"method.groups={self.groups!r}: W(1+1) has 1 or 2 scales per row")
        if isinstance(self.em_iters, bool) or not isinstance(self.em_iters, int) or self.em_iters < 1:
            # 0 used to be accepted and silently ran one iteration
            raise QATError(f"method.em_iters={self.em_iters!r}: must be an integer >= 1")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0 or self.block % 32:
            raise QATError(f"method.block={self.block!r}: must be 0 (whole rows) or a positive multiple of 32")
        check_choice("method.scope", self.scope, ["row"])
        check_ste_clip(self.ste_clip)

    def check_layer(self, name: str, out_features: int, in_features: int, gptq_block: int | None) -> None:
        if self.block and in_features % self.block:
            raise QATError(f"method.block={self.block} does not divide {name}'s in_features={in_features}; "
                           "allowed: 0 or a multiple of 32 that divides every quantized layer's in_features")
        if self.scale_slots(in_features) > MAX_SCALES_PER_ROW:
            raise QATError(f"method.block={self.block}: {name} would need {self.scale_slots(in_features)} scales "
                           f"per row, at most {MAX_SCALES_PER_ROW}; use a larger block")

    def n_blocks(self, in_features: int) -> int:
        return in_features // self.block if self.block else 1

    def scale_slots(self, in_features: int) -> int:
        return self.groups * self.n_blocks(in_features)

    def em(self, weight: Tensor, hdiag: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(group ids int64 [out, in] = block·groups + bit, levels [out, blocks, 2]) from the EM
        loop, run per row (per row-block)."""
        out, n = weight.shape
        nb = self.n_blocks(n)
        mag = weight.detach().abs().float().reshape(out * nb, n // nb)
        h = None if hdiag is None else hdiag.float().reshape(nb, n // nb).repeat(out, 1)
        bits, levels, _ = two_level_em(mag, h, self.em_iters)
        bits = bits.reshape(out, n).long() if self.groups == 2 else torch.zeros(out, n, dtype=torch.long,
                                                                                  device=weight.device)
        block_index = torch.arange(n, device=weight.device) // (n // nb)
        return block_index[None, :] * self.groups + bits, levels.reshape(out, nb, 2)

    def grouping(self, weight: Tensor) -> Tensor:
        return self.em(weight)[0]

    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> GroupedBinaryQuantizer:
        """Levels from the H_jj-weighted EM on the initial weights (fp16), fixed; GPTQ assigns."""
        ids, levels = self.em(weight, hdiag)
        out, n = weight.shape
        nb = self.n_blocks(n)
        if self.groups == 1:
            levels = weight.abs().float().reshape(out, nb, n // nb).mean(-1, keepdim=True)
        levels = levels[..., : self.groups].reshape(out, nb * self.groups)
        n_filled = (ids % self.groups).reshape(out, nb, n // nb).amax(-1) + 1
        return GroupedBinaryQuantizer(levels.to(torch.float16).float(), n_filled, weight.shape,
                                      block=n // nb if nb > 1 else 0)

    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sign plane, one group plane (the bit; the block is the column's) and fp16 scales
        [out, blocks·groups]. The bit-serial op's zero-point term Σ_j ŵ_nj is a function of these,
        so it is derived when the layer is used (`derived`), not stored."""
        ids = buffers["group_ids"].long()
        signs = pack_bits(latent >= 0)
        planes = [pack_bits((ids % 2).bool())] if self.groups == 2 else []
        scales = self.scales(latent.float(), ids).to(torch.float16)
        return {"signs": signs, "group_planes": torch.stack(planes) if planes else signs.new_empty(0, *signs.shape),
                "scales": scales}

    def derived(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """wsum [out, blocks] = Σ_j ŵ_nj per row-block, which only the INT4 bit-serial path reads
        (exports written before it was derived store it: used as stored)."""
        if self.act_bits != 4 or "wsum" in packed:
            return {}
        return {"wsum": row_block_weight_sums(packed["signs"], packed["group_planes"], packed["scales"],
                                              self.groups, in_features)}

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        """The packed ops per row-block of columns (one call when the scales are per row)."""
        clip = packed["act_clip"] if "act_clip" in packed else 1.0
        scales, signs, gplanes = packed["scales"], packed["signs"], packed["group_planes"]
        nb = scales.shape[1] // self.groups
        cols, words = in_features // nb, signs.shape[1] // nb
        if self.act_bits != 4:
            if self.act_bits < 16:
                x = fake_quant_act(x, self.act_bits, clip)
            if nb == 1:
                return ops.grouped_binary_gemm(x, signs, gplanes, scales, in_features)
            return sum(ops.grouped_binary_gemm(x[..., b * cols:(b + 1) * cols].contiguous(),
                                               signs[:, b * words:(b + 1) * words].contiguous(),
                                               gplanes[:, :, b * words:(b + 1) * words].contiguous(),
                                               scales[:, b * self.groups:(b + 1) * self.groups].contiguous(), cols)
                       for b in range(nb))
        lead = x.shape[:-1]
        q, s, z = int4_per_token(x.reshape(-1, in_features), clip)
        xplanes = bit_planes(q)
        if "wsum" not in packed:  # called on the stored tensors alone (PackedLinear hands it derived)
            packed = {**packed, **self.derived(packed, in_features)}
        wsum = packed["wsum"].reshape(signs.shape[0], nb)
        y = 0
        for b in range(nb):
            w_ = slice(b * words, (b + 1) * words)
            sc = scales[:, b * self.groups:(b + 1) * self.groups]
            if self.groups == 1:  # the bit-serial op reads two scales per row
                sc = sc.expand(-1, 2)
            gbits = gplanes[0][:, w_].contiguous() if gplanes.shape[0] else signs.new_empty(0)
            y = y + ops.w1a1x4_gemm(xplanes[:, :, w_].contiguous(), signs[:, w_].contiguous(), gbits,
                                    sc.contiguous(), wsum[:, b].contiguous(), s, z)
        return y.to(x.dtype).reshape(*lead, -1)

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """W(1+1) counts its group bit: 1 + 1 bits per weight + the two fp16 scales per row (block)."""
        return out_features * in_features * (1 + id_planes(self.groups)) + tensor_bits([packed["scales"]])

"""Dynamic grouping (WGM, methods.md §5): binary weights with a per-weight choice of scale.

The weights of a matrix (scope "matrix", as the paper's code) or of each row (scope "row") are
split into at most G groups of contiguous |w| (qat.quant.grouping); ŵ = sign(w)·alpha_g with
alpha_g = mean |w| of group g's members. The group of each weight is fixed by the PTQ seed (a
buffer); alpha_g is recomputed from the latent weights in every forward (the optimal scale
for fixed groups, as PB-LLM's alpha*) and rounded to fp16 as stored; sign through the STE.

Seeds: init=rtn groups the fp weights (data-free). init=gptq_hessian fixes the levels alpha_g
from that grouping and lets GPTQ assign each weight, from its error-compensated value, to the
nearest level (GroupedBinaryQuantizer).

Packed form: sign plane + ceil(log2 G) group-id planes (int32, 32 weights a word) + fp16
scales [1 or rows, G]. Honest bits: 1 + ceil(log2 G) per weight + the scales. The paper's
figure, (n + 16·G)/n, leaves out the ids: it is what `bits.weight` reports here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qat.errors import QATError, check_choice
from qat.kernels import ops
from qat.kernels.reference import group_ids_from_planes
from qat.methods.base import ColumnQuantizer, GPTQResult, Method, check_ste_clip
from qat.quant.binarize import ste_sign
from qat.quant.bits import tensor_bits
from qat.quant.grouping import ALGORITHMS, SCOPES, gather_scales, group_ids, group_scales, groups_used
from qat.quant.packing import pack_bits

MAX_GROUPS = 256   # ids fit 8 planes (and a uint8 buffer)
DP_MAX_WEIGHTS = 4096  # the exact programme is O(G·n²) per grouping


def id_planes(n_groups: int) -> int:
    """Bit planes needed for group ids 0..G-1."""
    return math.ceil(math.log2(n_groups)) if n_groups > 1 else 0


@dataclass
class GroupedBinaryRecord:
    """What GPTQ chose: each weight's group id [out, in] (int64) and the fixed levels [1 or rows, G]."""
    ids: Tensor
    levels: Tensor


class GroupedBinaryQuantizer(ColumnQuantizer):
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

    def record(self) -> GroupedBinaryRecord:
        return GroupedBinaryRecord(self.ids, self.levels)


@dataclass
class DynamicGrouping(Method):
    name: ClassVar[str] = "dyngroup"
    supports_gptq: ClassVar[bool] = True
    groups: int = 4              # G: at most this many scales per matrix (or row)
    algorithm: str = "windowed"  # dp | greedy | windowed
    window: int = 64             # sorted magnitudes per initial window (windowed)
    tail: int = 64               # the largest magnitudes per grouping that start as singletons (0: the paper's WGM)
    lambda_reg: float = 0.75     # the objective's lambda/|A| term (magnitudes in units of their mean |w|)
    scope: str = "row"           # row | matrix (the paper's code)
    refine_iters: int = 10       # Lloyd steps on the cut points after greedy merging
    regroup_every: int = 0       # QAT: re-group the latent weights every N steps (0: never)
    ste_clip: float | None = None

    def validate(self) -> None:
        for knob, value, lo in (("groups", self.groups, 1), ("window", self.window, 1), ("tail", self.tail, 0),
                                ("refine_iters", self.refine_iters, 0), ("regroup_every", self.regroup_every, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise QATError(f"method.{knob}={value!r}: must be an integer >= {lo}")
        if self.groups > MAX_GROUPS:
            raise QATError(f"method.groups={self.groups!r}: at most {MAX_GROUPS}")
        check_choice("method.algorithm", self.algorithm, ALGORITHMS)
        check_choice("method.scope", self.scope, SCOPES)
        if not isinstance(self.lambda_reg, (int, float)) or self.lambda_reg < 0:
            raise QATError(f"method.lambda_reg={self.lambda_reg!r}: must be a number >= 0")
        check_ste_clip(self.ste_clip)

    # -- grouping --------------------------------------------------------------------------
    def grouping(self, weight: Tensor) -> Tensor:
        """Group id (int64) of every weight."""
        per_grouping = weight.numel() if self.scope == "matrix" else weight.shape[1]
        if self.algorithm == "dp" and per_grouping > DP_MAX_WEIGHTS:
            raise QATError(f"method.algorithm=dp is exact but O(G·n²): {per_grouping} weights per "
                           f"grouping (scope={self.scope}) is above {DP_MAX_WEIGHTS}; use greedy or windowed")
        return group_ids(weight.float(), self.groups, self.algorithm, self.window, self.lambda_reg,
                         self.scope, self.refine_iters, self.tail)

    def scale_slots(self, in_features: int) -> int:
        """Scales per grouping (matrix or row): G here; W(1+1) with row-blocks has G per block."""
        return self.groups

    def scales(self, latent: Tensor, ids: Tensor) -> Tensor:
        """alpha_g from the latent weights, rounded to fp16 (what the packed layer stores) with a
        straight-through gradient. [1 or rows, G]."""
        alpha = group_scales(latent, ids, self.scale_slots(latent.shape[1]), self.scope)
        return alpha + (alpha.to(torch.float16).to(alpha.dtype) - alpha).detach()

    def regroup(self, latent: Tensor) -> Tensor:
        """New group ids from the current latent weights (method.regroup_every)."""
        return self.grouping(latent.detach()).to(torch.uint8)

    def refresh_every(self) -> int:
        return self.regroup_every

    def refresh(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"group_ids": self.regroup(latent)}

    # -- training form ---------------------------------------------------------------------
    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        return {"latent": weight.detach().clone(), "group_ids": self.grouping(weight).to(torch.uint8)}

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        ids = buffers["group_ids"].long()
        return ste_sign(latent, self.ste_clip) * gather_scales(self.scales(latent, ids), ids)

    # -- GPTQ (init=gptq_hessian) ----------------------------------------------------------------
    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> GroupedBinaryQuantizer:
        """Levels fixed up front from the data-free grouping of the initial weights."""
        ids = self.grouping(weight)
        levels = group_scales(weight.float(), ids, self.groups, self.scope).to(torch.float16).float()
        n_filled = ids.reshape(levels.shape[0], -1).amax(dim=1) + 1
        return GroupedBinaryQuantizer(levels, n_filled, weight.shape)

    def state_from_gptq(self, result: GPTQResult, record: GroupedBinaryRecord) -> dict[str, Tensor]:
        """Group ids as GPTQ assigned them; a latent weight with the compensated weights' signs,
        each group's magnitudes rescaled so that alpha_g recomputed from it is GPTQ's level."""
        ids, Wc, levels = record.ids, result.compensated, record.levels
        current = group_scales(Wc, ids, self.scale_slots(Wc.shape[1]), self.scope)
        factor = torch.where(current > 0, levels / current.clamp_min(torch.finfo(Wc.dtype).tiny),
                             torch.zeros_like(levels))
        latent = Wc * gather_scales(factor, ids)
        # a group whose compensated members are all 0 (sign +1): set them to the level itself
        latent = torch.where(gather_scales(current == 0, ids), gather_scales(levels, ids), latent)
        return {"latent": latent, "group_ids": ids.to(torch.uint8)}

    # -- inference form --------------------------------------------------------------------
    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        ids = buffers["group_ids"].long()
        planes = [pack_bits(((ids >> b) & 1).bool()) for b in range(id_planes(self.groups))]
        signs = pack_bits(latent >= 0)
        return {"signs": signs,
                "group_planes": torch.stack(planes) if planes else signs.new_empty(0, *signs.shape),
                "scales": self.scales(latent.float(), ids).to(torch.float16)}

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        return ops.grouped_binary_gemm(x, packed["signs"], packed["group_planes"], packed["scales"], in_features)

    def layer_stats(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """groups_used: how many of the G scales each grouping's weights use (lambda can merge below G)."""
        if "group_planes" not in packed:
            return {}
        ids = group_ids_from_planes(packed["group_planes"], packed["signs"].shape[0], in_features)
        return {"groups_used": groups_used(ids, self.groups, self.scope)}

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """The paper's count: 1 sign bit per weight + the fp16 scales, group ids left out
        (bits.storage counts them)."""
        return out_features * in_features + tensor_bits([packed["scales"]])

    @torch.no_grad()
    def health(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        alpha = group_scales(latent.float(), buffers["group_ids"].long(), self.scale_slots(latent.shape[1]),
                             self.scope)
        return {"alpha_mean": alpha.mean(), "alpha_max": alpha.max()}

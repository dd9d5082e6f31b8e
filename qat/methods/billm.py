"""BiLLM (arXiv 2402.04291; released code Aaronhuang-778/BiLLM): salient columns binarized twice,
the other weights split by magnitude into two groups binarized once each.

Per block of `block_size` columns (GPTQ's block):
- saliency per weight: w² / U_jj² with U the upper Cholesky factor of H⁻¹ (`salient_metric=hessian`;
  the released code divides by the squared diagonal of U's block) or w itself (`magnitude`);
- salient columns: the top i of the block's top `up_lim` columns by column sum of |saliency|,
  i in 1 .. up_lim-1 chosen by the error of an order-2 residual binarization of those columns
  plus one of the rest (qat.quant.billm.search_salient_columns);
- the other entries: a break point among 81 quantiles (0.10 .. 0.90) of the block's magnitudes
  splits them into a small and a large group (search_break_point);
- values: every group per row per block gets sign(r − μ)·α + μ with μ = mean r, α = mean|r − μ|
  over its entries; salient entries twice (order 2: the second on what the first left).

Quirks of the released code, and what is done here (default = the released code, because this
method is checked against it on identical tokens; `benchmarks/billm_reference.py`):
(a) Both searches measure their error on the saliency matrix w²/d², not on W; the masks found
    there are then applied to W. Default `search_on=saliency` (released); `search_on=weight`
    ranks columns by saliency but measures the errors on W (the paper's objective, written in W).
(b) A block is quantized entirely at its start: no error feedback between the columns of a
    block, only the lazy update of later blocks by the errors (w − q)/U_jj (the GPTQ loop's
    `whole_block` quantizers). Those errors ignore that the block's columns were not updated
    by each other: for a fixed block Q1, the update GPTQ's column loop would make spreads
    Err1 = (W1 − Q1)·U11⁻¹ (U11 the block's triangle of U). Default `block_errors=released`;
    `exact` uses U11⁻¹ (same search and values per block, better compensation of the later
    blocks; embedded default, layer 0, relative output error released -> exact: q_proj 0.0124 ->
    0.0085, o_proj 0.0167 -> 0.0034, down_proj 0.0467 -> 0.0451; not yet measured on ppl).
(c) torch.sign(0) = 0: an entry whose residual equals its row's μ gets μ. The searches (not
    stored) use torch.sign as released; the stored values use sign(0) = +1, because a sign bit
    has no 0. They differ only where a residual is exactly μ while α > 0: rare for trained
    weights, but the embedded default's weights come from a GGUF and repeat (8.6 % distinct
    values in layer 0's q_proj), so 3 of its layer 0's 7 linears differ from the released
    output, at equal output error; with torch.sign they are bit-identical. On the whole model
    (40 windows) the released code gives ppl 2971.9, this method with float32 and torch.sign
    exactly the same, the defaults (fp16, sign(0) = +1) 5093.0: BiLLM's block compensation
    grows weights to |w| ~5 and a single tie changes later blocks' structure, so ppl at this
    level is chaotic in such choices (benchmarks/results/billm_reference-*.json).
Also as released: the break point's quantiles count the salient entries as zeros, a row with no
entry in a group gets μ = α = 0, and the Hessian saliency's d is U_jj² whatever init.saliency
says (`hessian_denominator=released`; `init`: init.saliency's d_j). Not in the released code
(which fails there): up_lim is at most the block's width.
μ and α are rounded to `scale_dtype` (fp16, what is stored) before use, in GPTQ and in training,
so GPTQ's output, the training form and the packed form agree bit for bit (`float32`: as
released, stored in fp32).

Training form (QAT): the salient columns and the group bitmap are frozen buffers; μ and α are
recomputed from the latent weights in every forward (the optimal values for the fixed groups,
as PB-LLM's α*), signs through the STE. Seeds: init=gptq_hessian (the searches on the GPTQ
block's compensated weights, saliency from the Hessian) or init=rtn (data-free: magnitude).

Packed form: `signs` (order-1 sign of every weight, int32 [out, ceil(in/32)]), `residual_signs`
(order-2 sign of the salient entries only, [out, ceil(n_salient_columns/32)], columns in order),
`salient_columns` (bitmap over the columns, [ceil(in/32)]), `large_group` (bitmap [out,
ceil(in/32)], 1 = large group), `means` and `scales` (fp16 [out, blocks, 4], slots
qat.quant.billm.SLOTS). Dequantized in pure torch once per layer (`derived`), no kernel.
Bits: `bits.weight` is the paper's N_param = 1·(1 − r) + 2·r per weight, r the salient fraction
(the ~1.1 it quotes: sign planes only; the paper leaves out its "storing" bits 1 + 1/block for
the bitmaps and all scales). `bits.storage` counts every stored tensor (~1 + r + 1 + 1/out +
8·16/block: about 3.1 at block 128).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from qat.errors import QATError, check_choice, check_int
from qat.methods.base import ColumnQuantizer, GPTQResult, Method, check_ste_clip
from qat.quant.billm import SLOTS, billm_binarize, from_blocks, search_block, to_blocks
from qat.quant.binarize import sign_pm1, ste_sign
from qat.quant.packing import pack_bits, unpack_bits

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class BiLLM(Method):
    name: ClassVar[str] = "billm"
    supports_gptq: ClassVar[bool] = True
    salient_metric: str = "hessian"         # hessian (w²/U_jj², init=gptq_hessian) | magnitude (w)
    up_lim: int = 50                        # salient columns searched among the block's top up_lim
    block_size: int = 128                   # columns per structure block (= init.block_size)
    search_on: str = "saliency"             # saliency (released) | weight (errors measured on W)
    hessian_denominator: str = "released"   # released (U_jj²) | init (init.saliency's d_j)
    block_errors: str = "released"          # released ((w - q)/U_jj) | exact ((W1 - Q1)·U11⁻¹)
    scale_dtype: str = "float16"            # what mu and alpha are stored in: float16 | float32
    ste_clip: float | None = None

    def validate(self) -> None:
        check_choice("method.salient_metric", self.salient_metric, ["hessian", "magnitude"])
        check_int("method.up_lim", self.up_lim, 2)
        check_int("method.block_size", self.block_size, 1)
        check_choice("method.search_on", self.search_on, ["saliency", "weight"])
        check_choice("method.hessian_denominator", self.hessian_denominator, ["released", "init"])
        check_choice("method.block_errors", self.block_errors, ["released", "exact"])
        check_choice("method.scale_dtype", self.scale_dtype, sorted(SCALE_DTYPES))
        check_ste_clip(self.ste_clip)

    def check_layer(self, name: str, out_features: int, in_features: int, gptq_block: int | None) -> None:
        if gptq_block is not None and gptq_block != self.block_size:
            raise QATError(f"method.block_size={self.block_size} must equal init.block_size={gptq_block}: "
                           "BiLLM's structure blocks are GPTQ's blocks")

    # -- structure -------------------------------------------------------------------------
    def block_structure(self, W1: Tensor, denominator: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(salient columns [cols], large-group bitmap [rows, cols]) of one block of weights;
        `denominator` (d_j of the block's columns) with salient_metric=hessian."""
        if self.salient_metric == "magnitude":
            score = W1
        else:
            score = W1 ** 2 / denominator[None, :]
        target = score if self.search_on == "saliency" else W1
        return search_block(score, target, self.up_lim)

    def structure(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The data-free structure of a whole matrix: magnitude saliency, block by block."""
        if self.salient_metric == "hessian":
            raise QATError("salient_metric='hessian' needs calibration Hessians: use init=gptq_hessian "
                           "(or method.salient_metric=magnitude)")
        parts = [self.block_structure(weight[:, i:i + self.block_size])
                 for i in range(0, weight.shape[1], self.block_size)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1)

    def binarize(self, latent: Tensor, buffers: dict[str, Tensor], sign=sign_pm1):
        """BiLLM's values of a whole matrix for the stored structure (blocks of block_size)."""
        b, salient_columns = self.block_size, buffers["salient_columns"]
        return billm_binarize(to_blocks(latent, b), to_blocks(salient_columns, b),
                              to_blocks(buffers["large_group"], b), to_blocks(torch.ones_like(salient_columns), b),
                              sign, SCALE_DTYPES[self.scale_dtype])

    # -- training form ---------------------------------------------------------------------
    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        """The `rtn` seed: the structure searched on the fp weights (magnitude), latent = w."""
        weight = weight.detach().float()
        salient_columns, large = self.structure(weight)
        return {"latent": weight.clone(), "salient_columns": salient_columns, "large_group": large}

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        binarized = self.binarize(latent, buffers, lambda c: ste_sign(c, self.ste_clip))
        return from_blocks(binarized.weight, latent.shape[1])

    # -- GPTQ (init=gptq_hessian) ----------------------------------------------------------------
    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> BiLLMQuantizer:
        self.check_layer("this layer", *weight.shape, block_size)
        return BiLLMQuantizer(self, weight.shape, denominator if self.hessian_denominator == "init" else None)

    def data_free(self) -> BiLLM:
        """Hessian saliency needs calibration: the data-free seed (init=rtn) ranks by magnitude."""
        if self.salient_metric == "hessian":
            return dataclasses.replace(self, salient_metric="magnitude")
        return self

    def check_act_order(self) -> None:
        raise QATError("method=billm quantizes blocks of contiguous columns: init.act_order=true is not supported")

    def state_from_gptq(self, result: GPTQResult, record: BiLLMRecord) -> dict[str, Tensor]:
        """Every block was quantized from its weights at the block's start (result.compensated)
        with the structure searched there: the same function of the same latent is GPTQ's output."""
        return {"latent": result.compensated.clone(), "salient_columns": record.salient_columns.clone(),
                "large_group": record.large_group.clone()}

    # -- inference form --------------------------------------------------------------------
    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        in_f = latent.shape[1]
        binarized = self.binarize(latent.float(), buffers)
        salient_columns = buffers["salient_columns"]
        first = from_blocks(binarized.positive[0], in_f)
        second = from_blocks(binarized.positive[1], in_f)[:, salient_columns]
        dtype = SCALE_DTYPES[self.scale_dtype]
        return {"signs": pack_bits(first), "residual_signs": pack_bits(second),
                "salient_columns": pack_bits(salient_columns),
                "large_group": pack_bits(buffers["large_group"] & ~salient_columns),
                "means": binarized.means.to(dtype), "scales": binarized.scales.to(dtype)}

    def dequantize(self, packed: dict[str, Tensor], in_features: int) -> Tensor:
        """The fp32 weights of a packed layer: per slot sign·α + μ, salient entries both orders."""
        salient_columns = unpack_bits(packed["salient_columns"], in_features)
        first = unpack_bits(packed["signs"], in_features)
        out_f = first.shape[0]
        second = torch.zeros_like(first)
        second[:, salient_columns] = unpack_bits(packed["residual_signs"], int(salient_columns.sum()))
        large = unpack_bits(packed["large_group"], in_features)
        b = self.block_size
        s1, s2 = (to_blocks(torch.where(p, 1.0, -1.0), b) for p in (first, second))
        mu, alpha = packed["means"].float(), packed["scales"].float()
        value = [s1 * alpha[..., k:k + 1] + mu[..., k:k + 1] for k in range(3)]
        value[2] = value[2] + (s2 * alpha[..., 3:4] + mu[..., 3:4])
        w = torch.where(to_blocks(salient_columns, b).expand(out_f, -1, -1), value[2],
                        torch.where(to_blocks(large, b), value[1], value[0]))
        return from_blocks(w, in_features)

    def derived(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """The dequantized weights (pure torch, no kernel), computed once per layer."""
        return {"dequantized": self.dequantize(packed, in_features)}

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        w = packed["dequantized"] if "dequantized" in packed else self.dequantize(packed, in_features)
        return F.linear(x, w.to(x.dtype))

    def salient_column_count(self, packed: dict[str, Tensor], in_features: int) -> int:
        return int(unpack_bits(packed["salient_columns"], in_features).sum())

    def layer_stats(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """salient_fraction: r, the fraction of columns binarized twice."""
        return {"salient_fraction": torch.tensor([self.salient_column_count(packed, in_features) / in_features])}

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """The paper's N_param: one sign bit per weight, two per salient weight; the bitmaps and the
        fp16 μ, α are left out, as the paper leaves them out (bits.storage counts them)."""
        return out_features * (in_features + self.salient_column_count(packed, in_features))

    @torch.no_grad()
    def health(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        scales = self.binarize(latent.float(), buffers).scales
        return {f"alpha_{group}{order}_mean": scales[..., k].mean() for k, (group, order) in enumerate(SLOTS)}


@dataclass
class BiLLMRecord:
    """The structure BiLLM's GPTQ searched, block by block: what state_from_gptq reads."""
    salient_columns: Tensor  # bool [in]: the residual-binarized columns
    large_group: Tensor      # bool [out, in]: the non-salient weights above the block's break-point


class BiLLMQuantizer(ColumnQuantizer):
    """BiLLM inside GPTQ: each block's structure is searched on its weights at the block's start
    and the block binarized at once (no feedback inside the block, quirk (b)); `salient_columns`
    and `large_group` record the structure for the state."""

    whole_block = True

    def __init__(self, method: BiLLM, shape: torch.Size, denominator: Tensor | None = None):
        self.method, self.denominator = method, denominator
        self.salient_columns = torch.zeros(shape[1], dtype=torch.bool)
        self.large_group = torch.zeros(shape, dtype=torch.bool)

    def quantize_block(self, W1: Tensor, Hinv1: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        i1, width = int(cols[0]), W1.shape[1]
        if not torch.equal(cols, torch.arange(i1, i1 + width, device=cols.device)):
            raise QATError("method=billm quantizes blocks of contiguous columns: use init.act_order=false")
        self.salient_columns = self.salient_columns.to(W1.device)
        self.large_group = self.large_group.to(W1.device)
        # the released code: the block's squared diagonal of U (the variable it calls H is H⁻¹'s factor)
        d = torch.diag(Hinv1) ** 2 if self.denominator is None else self.denominator[cols]
        salient_columns, large = self.method.block_structure(W1, d)
        self.salient_columns[i1:i1 + width], self.large_group[:, i1:i1 + width] = salient_columns, large
        binarized = self.method.binarize(W1, {"salient_columns": salient_columns, "large_group": large})
        Q1 = from_blocks(binarized.weight, width)
        if self.method.block_errors == "released":
            return Q1, (W1 - Q1) / torch.diag(Hinv1)
        # the errors GPTQ's column loop would spread for this fixed Q1: W1 - Q1 = Err1·U11
        return Q1, torch.linalg.solve_triangular(Hinv1, W1 - Q1, upper=True, left=False)

    def record(self) -> BiLLMRecord:
        return BiLLMRecord(self.salient_columns, self.large_group)

"""PB-LLM: partially binarized weights (methods.md §2).

A fraction `salient_ratio` of each matrix's weights (element-wise, by |w| or by Hessian
saliency) is kept at `salient_bits` (per-row asymmetric, frozen: buffers, no gradient); the
rest is binarized as alpha*·sign(w) with alpha* = mean|w| over the non-salient entries of each
row (or column group), recomputed from the latent weights in every forward. sign(0)=+1.

`rtn_binary` is the same quantizer with salient_ratio=0: the plain binarized baseline.

Packed form: sign bits 32 per int32 (salient positions packed as +1), fp16 scales per
row/group, and the salient part as k-bit codes + fp16 per-row scale and zero + positions,
as a bitmap or a CSR column list (uint16), whichever stores fewer bits for the layer. The codes
are stored as uint8 (k = 8), int16 (k = 16) or, for any other k, back to back in an int32 bit
stream (k bits each); the kernels read bytes / int16, so a stream is unpacked once per layer
(`derived`), not stored twice.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from qat.errors import QATError, check_choice, check_int, check_range
from qat.kernels import ops, reference
from qat.kernels.fused import fused_extension, partial_binary_fused
from qat.kernels.reference import SALIENT_BITMAP, SALIENT_CSR, SALIENT_NONE, SALIENT_SLOTS
from qat.methods.base import ColumnQuantizer, GPTQResult, Method, check_group_size, check_ste_clip
from qat.quant.binarize import binarize_ste, expand_groups, optimal_alpha, refit_alpha_to_hessian, rescale_to_alpha
from qat.quant.bits import tensor_bits
from qat.quant.kbit import dequantize_kbit, minmax_params, pack_code_stream, quantize_kbit, unpack_code_stream
from qat.quant.packing import pack_bits, packed_words, row_popcounts
from qat.quant.salient import (
    dequantize_kbit_rows,
    hessian_saliency,
    quantize_kbit_rows,
    salient_mask_topk,
)

BINARIZERS = ["sign", "arb_x"]  # how the PB-GPTQ seed sets alpha (methods.md §2)
ALPHA_MODES = ["mean", "learned"]  # QAT's alpha: mean|w| recomputed every forward, or a trained parameter
NATIVE_CODE_BITS = (8, 16)  # k whose codes are stored one per uint8 / int16; any other k: a bit stream


def kernel_code_dtype(bits: int) -> torch.dtype:
    """The dtype the binary_gemm kernels read salient codes in (int16 holds 9..16-bit codes as
    their two's-complement bit pattern)."""
    return torch.uint8 if bits <= 8 else torch.int16


def salient_position_bits(out_f: int, in_f: int, nnz: int) -> dict[int, int]:
    """Bits each position format stores: CSR = uint16 column per entry + a uint16 count per row;
    bitmap = one bit per weight (its rows' counts are its popcounts). The kernels' int32 row
    pointers are derived from either (PartialBinary.derived)."""
    return {SALIENT_CSR: nnz * 16 + out_f * 16, SALIENT_BITMAP: out_f * packed_words(in_f) * 32}


def salient_row_counts(packed: dict[str, Tensor]) -> Tensor:
    """Salient weights per row of a packed layer (int64), from whichever the layer stores: the
    counts (CSR), the bitmap, or the int32 row pointers of exports written before 2026-12-02."""
    if "salient_row_ptr" in packed:
        row_ptr = packed["salient_row_ptr"].long()
        return row_ptr[1:] - row_ptr[:-1]
    if "salient_row_counts" in packed:  # uint16 as int16's bit pattern
        return packed["salient_row_counts"].long() & 0xFFFF
    return row_popcounts(packed["salient_positions"])


def salient_count(packed: dict[str, Tensor]) -> int:
    """How many salient weights a packed layer holds."""
    return int(salient_row_counts(packed).sum()) if "salient_format" in packed else 0


def blockwise_topk_mask(score: Tensor, ratio: float, block_size: int) -> Tensor:
    """Top-`ratio` of each block of `block_size` columns (PB-GPTQ's mask granularity)."""
    return torch.cat([salient_mask_topk(score[:, i:i + block_size], ratio)
                      for i in range(0, score.shape[1], block_size)], dim=1)


@dataclass
class PartialBinaryRecord:
    """What PB-GPTQ chose: the salient mask [out, in], alpha (fp16 values) [out, 1 or groups],
    and the salient values' k-bit scale and zero [out]."""
    mask: Tensor
    alpha: Tensor
    salient_scale: Tensor
    salient_zero: Tensor


class PartialBinaryQuantizer(ColumnQuantizer):
    """PB-GPTQ (methods.md §2), quantizing with exactly the parameters the training and packed
    forms store, so that the state handed to QAT reproduces GPTQ's output bit for bit:
    - salient mask: top-r of each block by |w| or by w²/d_j (d = `denominator`), chosen when
      the block starts from its current, already compensated weights (it follows the weights
      GPTQ's error feedback has grown, as PB-LLM's code does);
    - salient values: k-bit with one scale/zero per row, fixed up front from the row's range;
    - alpha (fp16): with `group_size` g > 0, one per row and group of g columns, the mean |w|
      of the group's non-salient entries when its block starts (g must divide the block);
      with g = 0, one per row, fixed up front from the non-salient entries of the initial
      weights under the same per-block mask rule; with binarizer=arb_x, refit after the loop
      (refine) to the calibration inputs for the signs chosen, mask and salient values kept."""

    def __init__(self, W: Tensor, ratio: float, bits: int, denominator: Tensor | None = None,
                 group_size: int = 0, block_size: int = 128, binarizer: str = "sign"):
        out_f, in_f = W.shape
        self.refits = binarizer == "arb_x"
        if group_size and (block_size % group_size or in_f % group_size):
            raise ValueError(f"group_size={group_size} must divide the GPTQ block ({block_size}) "
                             f"and in_features ({in_f})")
        self.ratio, self.bits, self.denominator, self.group_size = ratio, bits, denominator, group_size
        self.mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device)
        self.salient_scale, self.salient_zero = minmax_params(W, bits)
        if group_size == 0:
            keep = ~blockwise_topk_mask(self.score(W, torch.arange(in_f, device=W.device)), ratio, block_size)
            self.alpha = ((W.abs() * keep).sum(1) / keep.sum(1).clamp_min(1)).to(torch.float16).float()[:, None]
        else:
            self.alpha = torch.zeros(out_f, in_f // group_size, device=W.device)

    def score(self, block: Tensor, cols: Tensor) -> Tensor:
        return block.abs() if self.denominator is None else hessian_saliency(block, self.denominator[cols])

    def begin_block(self, W: Tensor, i1: int, i2: int, cols: Tensor) -> None:
        block = W[:, i1:i2]
        mask = salient_mask_topk(self.score(block, cols), self.ratio)
        self.mask[:, cols] = mask
        if self.group_size:
            g = self.group_size
            a = optimal_alpha(block, ~mask, g).to(torch.float16).float()
            self.alpha[:, i1 // g: i2 // g] = a  # no act_order with groups: positions are columns

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        alpha = self.alpha[:, 0 if self.group_size == 0 else col // self.group_size]
        binary = torch.where(w >= 0, alpha, -alpha)
        s, z = self.salient_scale, self.salient_zero
        salient = dequantize_kbit(quantize_kbit(w, s, z, self.bits), s, z)
        return torch.where(self.mask[:, col], salient, binary)

    def record(self) -> PartialBinaryRecord:
        return PartialBinaryRecord(self.mask, self.alpha, self.salient_scale, self.salient_zero)

    def refine(self, Q: Tensor, W: Tensor, H: Tensor) -> Tensor:
        """binarizer=arb_x: alpha refit to the calibration inputs for the signs the loop chose,
        the salient values fixed (qat.quant.binarize.refit_alpha_to_hessian), stored as fp16."""
        signs = torch.where(self.mask, 0.0, torch.where(Q >= 0, 1.0, -1.0))
        salient = torch.where(self.mask, Q, 0.0)
        alpha = refit_alpha_to_hessian(W - salient, signs, self.alpha, H, self.group_size)
        self.alpha = alpha.to(torch.float16).float()
        return salient + expand_groups(self.alpha, W.shape[1]) * signs


@dataclass
class PartialBinary(Method):
    name: ClassVar[str] = "pbllm_qat"
    supports_gptq: ClassVar[bool] = True
    salient_ratio: float = 0.1
    salient_bits: int = 8
    salient_metric: str = "magnitude"
    group_size: int = 0  # 0: one alpha per row
    ste_clip: float | None = None  # None: plain STE (PB-LLM's code); a float: zero grad beyond
    binarizer: str = "sign"  # the seed's alpha: sign (mean|w|) | arb_x (refit to the calibration inputs)
    alpha: str = "mean"  # QAT's alpha: mean (alpha* = mean|w| every forward, PB-LLM) | learned (from the seed's)

    def validate(self) -> None:
        check_range("salient_ratio", self.salient_ratio, 0.0, 1.0)
        if not (isinstance(self.salient_bits, int) and 2 <= self.salient_bits <= 16):
            raise QATError(f"salient_bits={self.salient_bits!r} is outside 2..16")
        check_choice("salient_metric", self.salient_metric, ["magnitude", "hessian"])
        check_choice("method.binarizer", self.binarizer, BINARIZERS)
        check_choice("method.alpha", self.alpha, ALPHA_MODES)
        check_int("method.group_size", self.group_size, 0)
        check_ste_clip(self.ste_clip)

    def check_layer(self, name: str, out_features: int, in_features: int, gptq_block: int | None) -> None:
        check_group_size(self.group_size, name, in_features, gptq_block)

    # -- training form ---------------------------------------------------------------------
    def salient_mask(self, weight: Tensor) -> Tensor:
        """The data-free mask: top-r of the matrix by |w|. Hessian saliency is chosen per GPTQ
        block by PB-GPTQ (gptq_quantizer), so it needs init=gptq_hessian."""
        if self.salient_metric == "hessian":
            raise QATError(
                "salient_metric='hessian' needs calibration Hessians: use init=gptq_hessian "
                "(or salient_metric=magnitude)"
            )
        return salient_mask_topk(weight.abs(), self.salient_ratio)

    def salient_buffers(self, weight: Tensor, mask: Tensor) -> dict[str, Tensor]:
        codes, scale, zero = quantize_kbit_rows(weight, mask, self.salient_bits)
        code_dtype = torch.uint8 if self.salient_bits <= 8 else torch.int32
        return {"salient_mask": mask, "salient_codes": codes.to(code_dtype),
                "salient_scale": scale, "salient_zero": zero}

    def learned_alpha(self, latent: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """alpha=learned: the scale QAT trains, starting from the seed's alpha* (mean|w| of the
        latent weight, which state_from_gptq rescales to GPTQ's alpha)."""
        if self.alpha != "learned":
            return {}
        return {"alpha": optimal_alpha(latent.float(), ~mask, self.group_size).to(torch.float16).float()}

    def trained_state(self) -> tuple[str, ...]:
        return ("alpha",) if self.alpha == "learned" else ()

    def current_alpha(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        """The alpha the layer multiplies with now: the learned one, or alpha* of the latent weights."""
        if "alpha" in buffers:
            return buffers["alpha"]
        return optimal_alpha(latent.float(), ~buffers["salient_mask"], self.group_size)

    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        """The `rtn` seed: salient mask on the fp weights, salient values k-bit, latent = w."""
        mask = self.salient_mask(weight)
        latent = weight.detach().clone()
        return {"latent": latent, **self.salient_buffers(weight, mask), **self.learned_alpha(latent, mask)}

    # -- PB-GPTQ (init=gptq_hessian) -----------------------------------------------------------
    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> PartialBinaryQuantizer:
        """Quantizes with the parameters this method stores (see PartialBinaryQuantizer)."""
        return PartialBinaryQuantizer(weight, self.salient_ratio, self.salient_bits,
                                      denominator if self.salient_metric == "hessian" else None,
                                      self.group_size, block_size, self.binarizer)

    def state_from_gptq(self, result: GPTQResult, record: PartialBinaryRecord) -> dict[str, Tensor]:
        """The state whose fake_quant is GPTQ's output exactly: the salient codes GPTQ chose
        (its per-row scale/zero) and a latent weight that keeps the compensated weights' signs
        and magnitudes, rescaled per alpha group so that alpha* recomputed from it is GPTQ's."""
        mask, Wc = record.mask, result.compensated
        scale, zero = record.salient_scale, record.salient_zero
        codes = quantize_kbit(Wc, scale[:, None], zero[:, None], self.salient_bits)
        codes = torch.where(mask, codes, torch.zeros_like(codes))
        code_dtype = torch.uint8 if self.salient_bits <= 8 else torch.int32
        latent = rescale_to_alpha(Wc, ~mask, record.alpha, self.group_size)
        return {"latent": latent, "salient_mask": mask.clone(), "salient_codes": codes.to(code_dtype),
                "salient_scale": scale.clone(), "salient_zero": zero.clone(), **self.learned_alpha(latent, mask)}

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        ext = fused_extension(latent, self.group_size)
        if ext is not None:  # fp32 CPU weight, one alpha per row: one C++ pass (qat/kernels/fused.py)
            return partial_binary_fused(latent, buffers, self.ste_clip, ext, salient=self.salient_ratio > 0)
        return self.fake_quant_reference(latent, buffers)

    def fake_quant_reference(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        """The training-form weight in pure torch (autograd through each op): the oracle of the
        fused CPU form, and the form on GPUs, in other dtypes and with alpha per column group."""
        mask = buffers["salient_mask"]
        binary, _ = binarize_ste(latent, ~mask, self.group_size, self.ste_clip, alpha=buffers.get("alpha"))
        if self.salient_ratio == 0:
            return binary
        salient = dequantize_kbit_rows(
            buffers["salient_codes"], buffers["salient_scale"], buffers["salient_zero"]
        ).to(latent.dtype)
        return torch.where(mask, salient, binary)

    # -- inference form --------------------------------------------------------------------
    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        mask = buffers["salient_mask"]
        out_f, in_f = latent.shape
        alpha = self.current_alpha(latent, buffers).to(torch.float16)
        packed = {"signs": pack_bits((latent >= 0) | mask), "scales": alpha}
        nnz = int(mask.sum())
        if nnz == 0:
            return packed
        cost = salient_position_bits(out_f, in_f, nnz)
        fmt = min(cost, key=cost.get)
        if in_f > 65535:
            fmt = SALIENT_BITMAP  # uint16 columns cannot address it
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: the value order of both formats
        if fmt == SALIENT_BITMAP:
            positions = pack_bits(mask)  # its rows' counts are its popcounts: nothing else stored
        else:
            positions = cols.to(torch.int32).to(torch.int16)
            # uint16: a CSR row has at most in_f <= 65535 entries
            packed["salient_row_counts"] = mask.sum(dim=1).to(torch.int32).to(torch.int16)
        codes = buffers["salient_codes"][rows, cols].to(torch.int32)
        packed.update({
            "salient_format": torch.tensor(fmt, dtype=torch.uint8),
            "salient_positions": positions,
            "salient_scale": buffers["salient_scale"].to(torch.float16),
            "salient_zero": buffers["salient_zero"].to(torch.float16),
        })
        if self.salient_bits in NATIVE_CODE_BITS:
            packed["salient_codes"] = codes.to(kernel_code_dtype(self.salient_bits))
        else:  # k bits per code, not a byte: what bits.weight counts is what is stored
            packed["salient_code_stream"] = pack_code_stream(codes, self.salient_bits)
        return packed

    def derived(self, packed: dict[str, Tensor], in_features: int) -> dict[str, Tensor]:
        """What the kernels read that is not stored: int32 row pointers (from the CSR counts or the
        bitmap's popcounts), the salient codes one per uint8 / int16 (from a stored stream), and on
        the CPU fp32 scales and the salient entries in the CPU kernel's slot layout
        (reference.salient_slots: 16 rows a block, each chunk of 32 columns' x held in registers and
        looked up by permutes instead of gathers; measured on the embedded default's layers: the
        salient part of a 1536x576 layer at M = 1 from 24 to 5 µs) and the signs blocked 16 rows
        a word (reference.blocked_signs: one load, not a gather; the binary part of the 210 layers
        of a decoded token 2.4 -> 1.9 ms). Memory, not storage: ~4.4 bytes per salient weight (the
        slots' padding included) and 1 bit per weight."""
        out: dict[str, Tensor] = {}
        row_ptr = packed.get("salient_row_ptr")  # stored by exports written before 2026-12-02
        if "salient_format" in packed and row_ptr is None:  # the kernels' int32 offsets
            counts = salient_row_counts(packed)
            row_ptr = out["salient_row_ptr"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        codes = packed.get("salient_codes")
        if "salient_code_stream" in packed:
            codes = unpack_code_stream(packed["salient_code_stream"], self.salient_bits, int(row_ptr[-1]))
            codes = out["salient_codes"] = codes.to(torch.int32).to(kernel_code_dtype(self.salient_bits))
        if packed["signs"].device.type != "cpu":
            return out
        # the CPU kernels compute in fp32: their scales as fp32 once, not converted on every call
        out.update({k: packed[k].float() for k in ("scales", "salient_scale", "salient_zero") if k in packed})
        out["signs_blocked"] = reference.blocked_signs(packed["signs"])  # 1 bit per weight of memory
        if "salient_format" in packed:
            n_rows, n_words = packed["signs"].shape
            rows, cols = reference.salient_positions(int(packed["salient_format"]), row_ptr,
                                                     packed["salient_positions"], n_rows, in_features)
            out["salient_slot_ptr"], out["salient_slot_cols"], out["salient_slot_codes"] = reference.salient_slots(
                rows, cols, codes, n_rows, n_words)
        return out

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        if (("salient_format" in packed and "salient_row_ptr" not in packed)
                or ("salient_code_stream" in packed and "salient_codes" not in packed)):
            packed = {**packed, **self.derived(packed, in_features)}  # PackedLinear hands them derived
        return ops.binary_gemm(x, packed["signs"], packed["scales"], in_features, *self._salient_args(packed))

    @staticmethod
    def _salient_args(packed: dict[str, Tensor]) -> tuple:
        """(format, row_ptr, positions, codes, scale, zero) of the op: the slot layout where derived."""
        if "salient_slot_ptr" in packed:
            return (SALIENT_SLOTS, packed["salient_slot_ptr"], packed["salient_slot_cols"],
                    packed["salient_slot_codes"], packed["salient_scale"], packed["salient_zero"])
        fmt = int(packed["salient_format"]) if "salient_format" in packed else SALIENT_NONE
        return (fmt, packed.get("salient_row_ptr"), packed.get("salient_positions"), packed.get("salient_codes"),
                packed.get("salient_scale"), packed.get("salient_zero"))

    def cpu_forward(self, packed: dict[str, Tensor], in_features: int) -> Callable[[Tensor], Tensor | None] | None:
        return ops.binary_gemm_cpu_call(packed["signs"], packed["scales"], in_features, *self._salient_args(packed),
                                        input_scale=packed.get("input_scale"),
                                        signs_blocked=packed.get("signs_blocked"))

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """1 bit per binary weight + k per salient weight + every stored scale/zero point;
        the positions (bitmap or CSR) are left out, as PB-LLM's paper leaves them out."""
        n = out_features * in_features
        nnz = salient_count(packed)
        scale_bits = tensor_bits(packed[k] for k in ("scales", "salient_scale", "salient_zero") if k in packed)
        return (n - nnz) + nnz * self.salient_bits + scale_bits

    # -- hooks ------------------------------------------------------------------------------
    def data_free(self) -> PartialBinary:
        """Hessian saliency and ARB-X need calibration: without it salient weights are chosen by
        |w| and alpha is mean|w|."""
        return dataclasses.replace(self, salient_metric="magnitude", binarizer="sign")

    def check_act_order(self) -> None:
        if self.group_size:
            raise QATError("init.act_order=true with a method group_size > 0 is not supported")

    def frozen_mask(self, buffers: dict[str, Tensor]) -> Tensor:
        return buffers["salient_mask"]

    def report_fields(self, calibrated: bool) -> dict[str, Any]:
        return {**super().report_fields(calibrated), "salient_ratio": self.salient_ratio}

    @torch.no_grad()
    def health(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = ~buffers["salient_mask"]
        alpha = self.current_alpha(latent, buffers)
        stats = {"alpha_mean": alpha.mean(), "alpha_std": alpha.std()}
        if self.ste_clip is not None:
            beyond = (latent.abs() > self.ste_clip) & keep
            stats["beyond_clip"] = beyond.float().sum() / keep.float().sum().clamp_min(1)
        return stats


@dataclass
class RTNBinary(PartialBinary):
    """Per-row alpha·sign(w), alpha = mean|w|, STE: PartialBinary with no salient weights."""

    name: ClassVar[str] = "rtn_binary"
    salient_ratio: float = 0.0

    def validate(self) -> None:
        if self.salient_ratio != 0:
            raise QATError(f"rtn_binary has no salient weights; got salient_ratio={self.salient_ratio!r}")
        super().validate()

"""`gptq`: uniform k-bit weights (asymmetric min/max, per row or per group of columns).

With init=gptq_hessian it is plain GPTQ, the reference every binarization paper compares
with; with init=rtn it is round-to-nearest. Training form: round through the STE with the
scales fixed. Packed form: floor(32/bits) codes per int32, fp16 scale and zero per group; it
runs through the pure-torch path (no CUDA kernel for int-k here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from qat.errors import QATError, check_int
from qat.methods.base import ColumnQuantizer, GPTQResult, Method, check_group_size
from qat.quant.bits import tensor_bits
from qat.quant.kbit import (
    dequantize_kbit,
    fake_quant_kbit,
    kbit_codes,
    minmax_params,
    pack_codes,
    quantize_kbit,
    unpack_codes,
)


@dataclass
class KBitRecord:
    """The grid GPTQ quantized with: scale and zero [out, groups]."""
    scale: Tensor
    zero: Tensor


class KBitQuantizer(ColumnQuantizer):
    """Asymmetric min/max k-bit per row, or per group of `group_size` columns whose parameters
    are set when the group starts, from the matrix as of the current block's start (as the
    reference does). Columns are in GPTQ's (possibly permuted) order."""

    def __init__(self, W: Tensor, bits: int, group_size: int = 0):
        self.bits, self.group_size = bits, group_size
        out_f, in_f = W.shape
        self.n_groups = 1 if group_size == 0 else in_f // group_size
        self.scale = torch.zeros(out_f, self.n_groups, device=W.device)
        self.zero = torch.zeros(out_f, self.n_groups, device=W.device)
        if group_size == 0:
            self.scale[:, 0], self.zero[:, 0] = minmax_params(W, bits)

    def begin_block(self, W: Tensor, i1: int, i2: int, cols: Tensor) -> None:
        self.W = W

    def column(self, w: Tensor, pos: int, col: int) -> Tensor:
        g = 0 if self.group_size == 0 else pos // self.group_size
        if self.group_size and pos % self.group_size == 0:
            self.scale[:, g], self.zero[:, g] = minmax_params(self.W[:, pos: pos + self.group_size], self.bits)
        s, z = self.scale[:, g], self.zero[:, g]
        return dequantize_kbit(quantize_kbit(w, s, z, self.bits), s, z)

    def record(self) -> KBitRecord:
        return KBitRecord(self.scale, self.zero)


@dataclass
class KBit(Method):
    name: ClassVar[str] = "gptq"
    supports_gptq: ClassVar[bool] = True
    bits: int = 4
    group_size: int = 0   # 0: per row
    # GPTQ's column order is init.act_order (a GPTQ setting, for every method); the field stays so
    # that exports written with method.act_order=false still load
    act_order: bool = False

    def validate(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise QATError(f"bits={self.bits!r}: allowed 2, 3, 4, 8")
        check_int("method.group_size", self.group_size, 0)
        if self.act_order:
            raise QATError("method.act_order is set by init.act_order=true (GPTQ's column order, any method)")

    def check_act_order(self) -> None:
        if self.group_size:
            raise QATError("init.act_order=true with a method group_size > 0 is not supported "
                           "(groups would not be contiguous)")

    def check_layer(self, name: str, out_features: int, in_features: int, gptq_block: int | None) -> None:
        check_group_size(self.group_size, name, in_features, None)

    def _params(self, W: Tensor) -> tuple[Tensor, Tensor]:
        out_f, in_f = W.shape
        g = in_f if self.group_size == 0 else self.group_size
        if in_f % g:
            raise QATError(f"group_size={self.group_size} does not divide in_features={in_f}")
        s, z = minmax_params(W.reshape(out_f * (in_f // g), g), self.bits)
        return s.reshape(out_f, -1), z.reshape(out_f, -1)

    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        s, z = self._params(weight)
        return {"latent": weight.detach().clone(), "scale": s, "zero": z}

    def gptq_quantizer(self, weight: Tensor, denominator: Tensor, block_size: int = 128,
                       hdiag: Tensor | None = None) -> KBitQuantizer:
        return KBitQuantizer(weight.float(), self.bits, self.group_size)

    def state_from_gptq(self, result: GPTQResult, record: KBitRecord) -> dict[str, Tensor]:
        return {"latent": result.compensated, "scale": record.scale.clone(), "zero": record.zero.clone()}

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        return fake_quant_kbit(latent, buffers["scale"], buffers["zero"], self.bits)

    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        codes = kbit_codes(latent.float(), buffers["scale"], buffers["zero"], self.bits)
        return {"codes": pack_codes(codes, self.bits), "scale": buffers["scale"].to(torch.float16),
                "zero": buffers["zero"].to(torch.float16)}

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        codes = unpack_codes(packed["codes"], self.bits, in_features).float()
        s, z = packed["scale"].float(), packed["zero"].float()
        g = in_features // s.shape[1]
        w = dequantize_kbit(codes, s.repeat_interleave(g, 1), z.repeat_interleave(g, 1))
        return F.linear(x, w.to(x.dtype))

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        return out_features * in_features * self.bits + tensor_bits([packed["scale"], packed["zero"]])

"""fp16: no weight quantization. The reference every other method is compared with; with
act_bits=4|8 it is W16A4 / W16A8, the activation quantization's error alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from qat.methods.base import Method


@dataclass
class FP16(Method):
    name: ClassVar[str] = "fp16"
    data_free_only: ClassVar[bool] = True

    @property
    def quantizes(self) -> bool:  # type: ignore[override]
        """Layers become QATLinear only when their inputs are quantized (weights stay fp16)."""
        return self.act_bits < 16

    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        return {"latent": weight.detach().clone()}

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        return latent.to(torch.float16).to(latent.dtype)

    @torch.no_grad()
    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"fp16_weight": latent.to(torch.float16)}

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        return F.linear(x, packed["fp16_weight"].to(x.dtype))

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        return 16.0 * out_features * in_features

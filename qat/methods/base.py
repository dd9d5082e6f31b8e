"""What a quantization method supplies to the generic QATLinear / PackedLinear.

A method is a small config object with four functions:
  init_state(weight, hessian)   -> buffers for the training form (the PTQ "rtn" seed)
  fake_quant(latent, buffers)   -> the weight the training form multiplies with (STE inside)
  pack(latent, buffers)         -> the tensors the inference form stores
  packed_linear(x, packed)      -> the inference form's output, through qat.kernels ops
QATLinear and PackedLinear never look at a method's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


@dataclass
class Method:
    name: ClassVar[str] = "base"
    quantizes: ClassVar[bool] = True  # False: the layer stays an nn.Linear (the fp reference)

    def validate(self) -> None:
        """Raise QATError on a bad setting."""

    def init_state(self, weight: Tensor, hessian: Tensor | None = None) -> dict[str, Tensor]:
        """Buffers for QATLinear; key 'latent' (optional) replaces the trainable weight."""
        raise NotImplementedError

    def fake_quant(self, latent: Tensor, buffers: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def pack(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def packed_linear(self, x: Tensor, packed: dict[str, Tensor], in_features: int) -> Tensor:
        raise NotImplementedError

    def weight_bits(self) -> float | None:
        """The 'weight bits' a paper would quote, without scales (None: not quantizing)."""
        return None

    def packed_weight_bits(self, packed: dict[str, Tensor], out_features: int, in_features: int) -> float:
        """Weight bits of one packed layer as papers count them (values + scales, no positions)."""
        raise NotImplementedError

    @torch.no_grad()
    def health(self, latent: Tensor, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-layer statistics for the quantization-health log (optional)."""
        return {}

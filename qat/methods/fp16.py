"""fp16: no quantization. The reference every other method is compared with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qat.methods.base import Method


@dataclass
class FP16(Method):
    name: ClassVar[str] = "fp16"
    quantizes: ClassVar[bool] = False

    def weight_bits(self) -> float:
        return 16.0

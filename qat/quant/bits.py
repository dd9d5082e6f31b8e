"""Bit accounting: counted from the tensors a packed layer really stores."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def tensor_bits(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


def paper_weight_bits(salient_ratio: float, salient_bits: int, scale_bits_per_weight: float) -> float:
    """PB-LLM's 'weight bits': (1-r)·1 + r·k, plus the scales (no salient positions)."""
    return (1 - salient_ratio) * 1 + salient_ratio * salient_bits + scale_bits_per_weight

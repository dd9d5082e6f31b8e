"""Bit accounting: counted from the tensors a packed layer really stores."""
from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor


def tensor_bits(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors)

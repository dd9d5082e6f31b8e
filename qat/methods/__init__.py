"""Method registry: name -> config dataclass. Adding a method = one file here + one yaml."""
from __future__ import annotations

from typing import Any

from qat.errors import QATError, check_choice
from qat.methods.base import Method
from qat.methods.dyngroup import DynamicGrouping
from qat.methods.fp16 import FP16
from qat.methods.kbit import KBit
from qat.methods.pbllm import PartialBinary, RTNBinary

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (FP16, RTNBinary, PartialBinary, KBit, DynamicGrouping)}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls
    return cls


def build_method(name: str, **params: Any) -> Method:
    """Build and validate a method by name; unknown names and parameters give a QATError."""
    check_choice("method", name, sorted(REGISTRY))
    cls = REGISTRY[name]
    try:
        method = cls(**params)
    except TypeError as e:
        raise QATError(f"bad parameters for method {name!r}: {e}") from None
    method.validate()
    return method


__all__ = ["REGISTRY", "Method", "QATError", "build_method", "register"]

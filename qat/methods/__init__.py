"""Method registry: name -> config dataclass. Adding a method = one file in this package (a
Method subclass with its own `name`) + one yaml in conf/method/: every module here is imported
and every named subclass registered; no list to edit."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from qat.errors import QATError, check_choice, is_number
from qat.methods.base import Method
from qat.quant.activations import ACT_BITS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in _subclasses(Method) if cls.name != "base"}


def register(cls: type[Method]) -> type[Method]:
    """For a method defined outside this package (a user's own module)."""
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
    check_choice("method.act_bits", method.act_bits, list(ACT_BITS))
    check_smoothing(method)
    return method


def check_smoothing_alphas(knob: str, alphas: Any) -> tuple[float | str, ...]:
    """The smoothing candidates searched (SmoothQuant strengths in [0, 1] and/or "rc"), as a tuple;
    anything else is one QATError naming `knob` (smooth.alphas, or the method's field)."""
    if (not isinstance(alphas, (list, tuple)) or not alphas
            or not all(a == "rc" or (is_number(a) and 0 <= a <= 1) for a in alphas)):
        raise QATError(f"{knob}={alphas!r}: must be a non-empty list of numbers in [0, 1] "
                       "and/or rc (ARB-RC's column scales)")
    return tuple(a if a == "rc" else float(a) for a in alphas)


def check_smoothing(method: Method) -> None:
    if not isinstance(method.smooth, bool):
        raise QATError(f"method.smooth={method.smooth!r}: must be true or false")
    method.smooth_alphas = check_smoothing_alphas("method.smooth_alphas", method.smooth_alphas)


__all__ = ["REGISTRY", "Method", "QATError", "build_method", "register"]

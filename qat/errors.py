"""The one exception type users see: a bad value, named, with what is allowed."""


class QATError(ValueError):
    """A user-facing error. `train.py`/`eval.py` print its message on one line and exit 2."""


def check_choice(what: str, value: object, allowed: list) -> None:
    if value not in allowed:
        raise QATError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_range(what: str, value: float, lo: float, hi: float, hi_inclusive: bool = False) -> None:
    ok = lo <= value <= hi if hi_inclusive else lo <= value < hi
    if not ok:
        bracket = "]" if hi_inclusive else ")"
        raise QATError(f"{what}={value!r} is outside [{lo}, {hi}{bracket}")

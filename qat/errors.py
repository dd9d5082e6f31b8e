"""The one exception type users see: a bad value, named, with what is allowed."""


class QATError(ValueError):
    """A user-facing error. `train.py`/`eval.py` print its message on one line and exit 2."""


def check_choice(what: str, value: object, allowed: list) -> None:
    if value not in allowed:
        raise QATError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(what: str, value: object, lo: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= lo):
        raise QATError(f"{what}={value!r}: must be an integer >= {lo}")


def check_range(what: str, value: float, lo: float, hi: float, hi_inclusive: bool = False) -> None:
    if not is_number(value):
        bracket = "]" if hi_inclusive else ")"
        raise QATError(f"{what}={value!r} is not a number in [{lo}, {hi}{bracket}")
    ok = lo <= value <= hi if hi_inclusive else lo <= value < hi
    if not ok:
        bracket = "]" if hi_inclusive else ")"
        raise QATError(f"{what}={value!r} is outside [{lo}, {hi}{bracket}")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: training stops at once (the run folder keeps its last
    good checkpoint and a results.json with status "diverged"; train.py exits 3)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step}: {what}; the last good checkpoint is kept "
                         "(lower optim.lr, or set trainer.gradient_clip_val)")
        self.step, self.what = step, what


class TrainingInterrupted(RuntimeError):
    """SIGTERM (a scheduler's pre-emption) or Ctrl-C during training: the run folder keeps its last
    checkpoint and a results.json with status "interrupted"; train.py exits 128 + the signal."""

    EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        how = (f"resume with ckpt_path={checkpoint}" if checkpoint else
               "no checkpoint was written yet (checkpoint.every_n_steps): run it again")
        super().__init__(f"training interrupted by {signal_name} at step {step}; {how}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = self.EXIT_CODES.get(signal_name, 1)

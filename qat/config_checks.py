"""Every user-facing knob of a train config, checked before anything is loaded or written.

One table: the dotted key, what it must be, and its range. A bad value gives one QATError that
names the key, the value and what is allowed (train.py prints it on one line, exit code 2).
Method parameters are checked by the method's own `validate`; the checks that need the
model's shapes (group sizes that must divide in_features) by `Method.check_layer` after loading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qat.errors import QATError, check_choice
from qat.methods import check_smoothing_alphas
from qat.quant.activations import ACT_BITS

MISSING = object()


@dataclass(frozen=True)
class Knob:
    key: str
    kind: str                  # "int" | "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False      # lo itself not allowed
    hi_open: bool = False
    nullable: bool = False

    def allowed(self) -> str:
        what = "an integer" if self.kind == "int" else "a number"
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        text = f"{what} {' and '.join(parts)}".strip()
        return text + (" (or null)" if self.nullable else "")

    def check(self, value: Any) -> None:
        if value is None and self.nullable:
            return
        is_int = isinstance(value, int) and not isinstance(value, bool)
        ok = is_int if self.kind == "int" else (is_int or isinstance(value, float)) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise QATError(f"{self.key}={value!r}: must be {self.allowed()}")


def positive(key: str, kind: str = "int", nullable: bool = False) -> Knob:
    return Knob(key, kind, 0, lo_open=True, nullable=nullable)


def at_least(key: str, lo: float, kind: str = "int") -> Knob:
    return Knob(key, kind, lo)


KNOBS = [
    Knob("salient_ratio", "number", 0, 1, hi_open=True),
    at_least("seed", 0),
    at_least("quant_health_every", 0),
    at_least("trainer.max_steps", 0),
    positive("trainer.accumulate_grad_batches"),
    positive("trainer.val_check_interval", "number"),
    positive("trainer.limit_val_batches", "number"),
    Knob("trainer.gradient_clip_val", "number", 0, lo_open=True, nullable=True),
    positive("optim.lr", "number"),
    positive("optim.lr_fp", "number", nullable=True),
    positive("optim.lr_clip", "number", nullable=True),
    positive("optim.lr_scale", "number", nullable=True),
    at_least("optim.weight_decay", 0, "number"),
    positive("optim.eps", "number"),
    at_least("optim.warmup_steps", 0),
    Knob("optim.min_lr_ratio", "number", 0, 1),
    Knob("data.seq_len", "int", 2),
    positive("data.batch_size"),
    positive("data.val_blocks"),
    positive("data.test_chars"),
    positive("data.val_chars"),
    positive("eval.seq_len"),
    positive("eval.max_windows", nullable=True),
    positive("checkpoint.every_n_steps"),
    Knob("distill.alpha", "number", 0, 1),
    positive("distill.temperature", "number"),
    positive("init.n_samples"),
    Knob("init.seq_len", "int", 2),
    positive("init.block_size"),
    Knob("init.percdamp", "number", 0, 1, lo_open=True),
    at_least("reconstruct.epochs", 0),
    positive("reconstruct.lr", "number"),
    positive("reconstruct.n_samples"),
    Knob("reconstruct.seq_len", "int", 2),
]


def check_config(cfg: DictConfig) -> None:
    """Check every knob of the table present in `cfg` (presets may leave some out)."""
    for knob in KNOBS:
        value = OmegaConf.select(cfg, knob.key, default=MISSING)
        if value is not MISSING:
            knob.check(value)
    for key, nullable in (("export.folder", True), ("export.gguf", False), ("eval.cache_fp", False)):
        value = OmegaConf.select(cfg, key, default=None)
        if not (isinstance(value, bool) or (value is None and nullable)):
            raise QATError(f"{key}={value!r}: must be true or false" + (" (or null)" if nullable else ""))
    betas = OmegaConf.select(cfg, "optim.betas", default=None)
    if betas is not None:
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise QATError(f"optim.betas={list(betas)!r}: must be two numbers in [0, 1)")

    check_choice("act.bits", OmegaConf.select(cfg, "act.bits"), list(ACT_BITS))
    check_smoothing(cfg)


def check_smoothing(cfg: DictConfig) -> None:
    enabled = OmegaConf.select(cfg, "smooth.enabled")
    if not isinstance(enabled, bool):
        raise QATError(f"smooth.enabled={enabled!r}: must be true or false")
    alphas = OmegaConf.select(cfg, "smooth.alphas", default=None)
    if enabled:
        check_smoothing_alphas("smooth.alphas", list(alphas) if OmegaConf.is_list(alphas) else alphas)


# knobs that moved out of conf/method/*.yaml into their own groups: the old name is one clear error
MOVED_METHOD_KNOBS = {
    "act_bits": "act=int4 | int8 | none (the act group; act.bits=4|8|16)",
    "smooth": "smooth=rc | smoothquant | none (the smooth group)",
    "smooth_alphas": "smooth.alphas=[...] (with smooth=smoothquant or smooth=rc)",
}


def check_moved_method_knobs(method_params: dict[str, Any]) -> None:
    """A method yaml or `+method.<knob>=` that still sets a moved knob."""
    for key, instead in MOVED_METHOD_KNOBS.items():
        if key in method_params:
            raise QATError(f"method.{key} is now {instead}")


def moved_knob_error(overrides: list[str]) -> str | None:
    """The command line's first override of a moved knob (`method.act_bits=4`, `+method.smooth=true`),
    as one line naming the new one; None when there is none. Checked by train.py before Hydra
    composes, which would otherwise reject the key with its own multi-line message."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("method.") and key[len("method."):] in MOVED_METHOD_KNOBS:
            return f"{key} is now {MOVED_METHOD_KNOBS[key[len('method.'):]]}"
    return None

"""Callbacks: quantization health to the logger, and checkpoints written atomically."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from qat.nn.qat_linear import QATLinear
from qat.quant.packing import pack_bits, unpack_bits
from qat.train.sharding import full


class QuantHealth(L.Callback):
    """Every `every` steps: share of binary weights whose sign flipped since the last check,
    the method's own statistics (alpha mean/std, share beyond the STE clip), averaged."""

    def __init__(self, every: int = 10):
        self.every = every
        self.last_signs: dict[str, torch.Tensor] = {}

    def _snapshot(self, module) -> dict[str, torch.Tensor]:
        return {n: pack_bits(full(m.weight.detach()) >= 0) for n, m in module.named_modules()
                if isinstance(m, QATLinear)}

    def on_train_start(self, trainer, pl_module):
        self.last_signs = self._snapshot(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every <= 0 or step % self.every or not self.last_signs:
            return
        flips, total, stats = 0, 0, {}
        now = self._snapshot(pl_module.model)
        for name, m in pl_module.model.named_modules():
            if not isinstance(m, QATLinear):
                continue
            frozen = m.method.frozen_mask(m.quant_buffers())  # e.g. PB-LLM's salient weights: no sign to flip
            keep = ~frozen if frozen is not None else torch.ones_like(m.weight, dtype=torch.bool)
            changed = torch.bitwise_xor(now[name], self.last_signs[name])
            flipped = unpack_bits(changed, keep.shape[1])
            flips += int((flipped & keep).sum())
            total += int(keep.sum())
            buffers = {k: full(v) for k, v in m.quant_buffers().items()}  # a learned scale is a (sharded) parameter
            for k, v in m.method.health(full(m.weight), buffers).items():
                stats.setdefault(k, []).append(float(v))
        self.last_signs = now
        metrics = {"quant/sign_flip_rate": flips / max(total, 1)}
        metrics.update({f"quant/{k}": sum(v) / len(v) for k, v in stats.items()})
        pl_module.log_dict(metrics)


class AtomicModelCheckpoint(ModelCheckpoint):
    """Write each checkpoint to a temp name, then rename: a crash never leaves half a file."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        tmp = str(Path(filepath).with_name(f".{Path(filepath).name}.tmp"))
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)


class RefreshBuffers(L.Callback):
    """Every `every` steps (the method's refresh_every), copy the method's `refresh` of its frozen
    buffers from the current latent weights into each QATLinear (dyngroup's method.regroup_every:
    the group ids are buffers the optimizer never moves)."""

    def __init__(self, every: int):
        self.every = every

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every:
            return
        for m in pl_module.model.modules():
            if isinstance(m, QATLinear):
                for name, value in m.method.refresh(full(m.weight), m.quant_buffers()).items():
                    getattr(m, name).copy_(value)

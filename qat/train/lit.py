"""The LightningModule: LM loss (CE, KL to a frozen fp teacher, or a mix); the optimizer and the
cosine schedule are built from conf/optim (hydra.utils.instantiate)."""
from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from qat.errors import QATError, TrainingDiverged, check_choice
from qat.nn.qat_linear import QATLinear, frozen_quantized_weights
from qat.train.sharding import full, is_sharded, shard_model


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened next-token distributions, ·T²."""
    t = temperature
    s = F.log_softmax(logits[:, :-1].float() / t, dim=-1)
    p = F.log_softmax(teacher_logits[:, :-1].float() / t, dim=-1)
    return F.kl_div(s.flatten(0, 1), p.flatten(0, 1), log_target=True, reduction="batchmean") * t * t


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


TRAINABLE = ["quantized", "quantized+norms", "all"]


def select_trainable(model: nn.Module, which: str) -> dict[str, int]:
    """Set requires_grad for what QAT trains: `quantized` (the quantized linears' latent weights
    and biases), `quantized+norms` (and the normalization layers' weights), `all` (everything,
    the embedding included). Returns the number of trainable parameters per kind."""
    check_choice("train.params", which, TRAINABLE)
    counts = {"quantized": 0, "norms": 0, "other": 0}
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, QATLinear):
            kind = "quantized"
        elif "norm" in type(m).__name__.lower():
            kind = "norms"
        else:
            kind = "other"
        train = kind == "quantized" or which == "all" or (which == "quantized+norms" and kind == "norms")
        for p in own:
            p.requires_grad_(train)
            counts[kind] += p.numel() if train else 0
    return counts


OPTIMIZERS = ["adamw", "adamw8bit"]


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """optim.scheduler's target: cosine_with_warmup per step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, int(warmup_steps), total_steps, float(min_lr_ratio)))


def build_optimizer(params: list[dict], cfg: dict) -> torch.optim.Optimizer:
    """optim.optimizer (a `_partial_` target) on the parameter groups; optim.lr is its default lr."""
    check_choice("optim.name", cfg["name"], OPTIMIZERS)
    target = cfg["optimizer"]["_target_"]
    try:
        make = instantiate(cfg["optimizer"], _convert_="all")
    except InstantiationException:  # the target's package is not installed (bitsandbytes)
        raise QATError(f"optim.name={cfg['name']} needs {target.split('.')[0]}") from None
    return make(params, lr=float(cfg["lr"]))


def param_groups(model: nn.Module, cfg: dict) -> list[dict]:
    """AdamW's groups: the quantized layers' latent weights at optim.lr, never decayed (decay pulls
    |w| down, and alpha* = mean |w| with it: the binarized output shrinks); the activations'
    clipping logits at optim.lr_clip (Adam moves a parameter by about lr a step, and at logit 4
    sigmoid' = 0.018: at 1e-3 a clip would stay within 0.2 % of its start over 100 steps); fp
    parameters (norms, embedding) at optim.lr_fp (null: lr), decayed by optim.weight_decay where 2-D;
    a method's trained state (a learned scale: method.alpha=learned) at optim.lr_scale, not decayed."""
    lr = float(cfg["lr"])

    def lr_of(key: str) -> float:
        return lr if cfg.get(key) is None else float(cfg[key])

    wd = float(cfg["weight_decay"])
    kinds: dict[int, tuple[float, float]] = {}
    for m in model.modules():
        if isinstance(m, QATLinear):
            for name, p in m.named_parameters(recurse=False):
                key = "lr_clip" if name == "act_clip" else "lr_scale" if name in m.param_names else "lr"
                kinds[id(p)] = (lr_of(key), 0.0)
    lr_fp = lr_of("lr_fp")
    groups: dict[tuple[float, float], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = kinds.get(id(p), (lr_fp, wd if p.ndim >= 2 else 0.0))
            groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": g_lr, "weight_decay": g_wd} for (g_lr, g_wd), ps in groups.items()]


class LitQAT(L.LightningModule):
    def __init__(self, model: nn.Module, optim: dict, distill: dict, total_steps: int,
                 teacher: nn.Module | None = None, method: dict | None = None):
        super().__init__()
        self.model, self.optim_cfg, self.distill_cfg = model, optim, distill
        self.method_record = method  # {"name", "params"}: saved in checkpoints, checked on resume
        self.total_steps = total_steps
        self.alpha = float(distill["alpha"])
        if not 0.0 <= self.alpha <= 1.0:
            raise QATError(f"distill.alpha={self.alpha} is outside [0, 1]")
        if self.alpha > 0 and teacher is None:
            raise QATError("distill.alpha > 0 needs a teacher model")
        self.teacher = [teacher]  # a list keeps it out of the module tree (frozen, not saved)
        if teacher is not None:
            teacher.eval().requires_grad_(False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.method_record is not None:
            checkpoint["qat_method"] = self.method_record

    def configure_model(self) -> None:
        """trainer.strategy=fsdp: shard the model across the data-parallel ranks (FSDP2)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy):
            shard_model(self.model, self.device_mesh["data_parallel"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens).logits

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens)
        ce = lm_loss(logits, tokens)
        loss = ce
        if self.alpha > 0:
            teacher = self.teacher[0].to(tokens.device)
            with torch.no_grad():
                t_logits = teacher(tokens).logits
            kd = distill_loss(logits, t_logits, float(self.distill_cfg["temperature"]))
            loss = (1 - self.alpha) * ce + self.alpha * kd
            self.log("train/kd", kd)
        if not torch.isfinite(loss):
            raise TrainingDiverged(self.global_step, f"loss={float(loss.detach())}")
        self.log("train/ce", ce, prog_bar=True)
        self.log("train/loss", loss)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_before_optimizer_step(self, optimizer):
        # before clipping and the update: a non-finite gradient never reaches the weights
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            # (under FSDP a gradient is a shard: full() sums the shards' norms over the ranks)
            norm = torch.linalg.vector_norm(torch.stack([full(torch.linalg.vector_norm(g.float())) for g in grads]))
            if not torch.isfinite(norm):
                raise TrainingDiverged(self.global_step, f"gradient norm={float(norm)}")
            self.log("train/grad_norm", norm)

    def on_validation_epoch_start(self):
        # the fake-quant weights built once per validation, not once per batch (CPU, unsharded)
        self._frozen = contextlib.ExitStack()
        if self.device.type == "cpu" and not is_sharded(self.model):
            self._frozen.enter_context(frozen_quantized_weights(self.model))

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        ce = lm_loss(self(tokens), tokens)
        self.log("val/ce", ce, prog_bar=False, sync_dist=True)

    def on_validation_epoch_end(self):
        self._frozen.close()
        ce = self.trainer.callback_metrics.get("val/ce")
        if ce is not None:
            self.log("val/ppl", torch.exp(ce), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = build_optimizer(param_groups(self.model, self.optim_cfg), self.optim_cfg)
        sched = instantiate(self.optim_cfg["scheduler"])(opt, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

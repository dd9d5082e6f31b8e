"""Training form: a linear whose weight is fake-quantized by a method in every forward."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.methods.base import Method
from qat.quant.activations import ACT_CLIP_INIT, fake_quant_act


class QATLinear(nn.Module):
    """`weight` is the latent full-precision parameter the STE trains; the method's state
    (salient mask, frozen salient codes, ...) lives in buffers: no gradient, no weight decay;
    the entries the method names in `trained_state()` (e.g. a learned scale) are parameters.
    `input_scale` (optional, from smoothing where no norm could absorb it): inputs are divided
    by it per channel before they are quantized."""

    def __init__(self, in_features: int, out_features: int, method: Method,
                 state: dict[str, Tensor], bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.weight = nn.Parameter(state["latent"])
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.param_names = [k for k in method.trained_state() if k in state]
        self.buffer_names = [k for k in state if k not in ("latent", "input_scale", *self.param_names)]
        self.register_buffer("input_scale", state.get("input_scale"))
        for name in self.buffer_names:
            self.register_buffer(name, state[name])
        for name in self.param_names:
            self.register_parameter(name, nn.Parameter(state[name]))
        if method.act_bits < 16:  # the inputs' clipping factor, sigmoid(act_clip), trained in QAT
            self.act_clip = nn.Parameter(torch.tensor(ACT_CLIP_INIT, device=state["latent"].device))

    def quant_buffers(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in (*self.buffer_names, *self.param_names)}

    frozen_weight: Tensor | None = None  # set by frozen_quantized_weights: the weight of an evaluation

    def quantized_weight(self) -> Tensor:
        if self.frozen_weight is not None and not torch.is_grad_enabled():  # never in a training step
            return self.frozen_weight
        return self.method.fake_quant(self.weight, self.quant_buffers())

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.method.act_bits < 16:
            x = fake_quant_act(x, self.method.act_bits, torch.sigmoid(self.act_clip))
        w = self.quantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method}"


@contextmanager
def frozen_quantized_weights(model: nn.Module) -> Iterator[None]:
    """Inside: every QATLinear multiplies with its fake-quantized weight computed once on entry,
    not rebuilt in each forward (an evaluation of 40 windows rebuilt each of the embedded default's
    210 weights 40 times). For evaluation only: the weights must not change inside, and it holds one
    dense copy of every quantized weight."""
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    try:
        with torch.no_grad():
            for m in layers:
                m.frozen_weight = m.quantized_weight()
        yield
    finally:
        for m in layers:
            m.frozen_weight = None


def quantizable_linears(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules to quantize: every one whose name matches no `skip` entry."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(s in name for s in skip)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def prepare(model: nn.Module, method: Method, states: dict[str, dict[str, Tensor]]) -> nn.Module:
    """nn.Linear -> QATLinear for every layer that has a state (built by qat.ptq.initializers.initialize)."""
    for name, state in states.items():
        lin = model.get_submodule(name)
        q = QATLinear(lin.in_features, lin.out_features, method, state,
                      None if lin.bias is None else lin.bias.detach().clone())
        set_submodule(model, name, q.to(lin.weight.device))
    return model

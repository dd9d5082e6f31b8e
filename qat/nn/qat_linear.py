"""Training form: a linear whose weight is fake-quantized by a method in every forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.methods.base import Method
from qat.quant.activations import ACT_CLIP_INIT, fake_quant_act


class QATLinear(nn.Module):
    """`weight` is the latent full-precision parameter the STE trains; the method's state
    (salient mask, frozen salient codes, ...) lives in buffers: no gradient, no weight decay.
    `input_scale` (optional, from smoothing where no norm could absorb it): inputs are divided
    by it per channel before they are quantized."""

    def __init__(self, in_features: int, out_features: int, method: Method,
                 state: dict[str, Tensor], bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.weight = nn.Parameter(state["latent"])
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.buffer_names = [k for k in state if k not in ("latent", "input_scale")]
        self.register_buffer("input_scale", state.get("input_scale"))
        for name in self.buffer_names:
            self.register_buffer(name, state[name])
        if method.act_bits < 16:  # the inputs' clipping factor, sigmoid(act_clip), trained in QAT
            self.act_clip = nn.Parameter(torch.tensor(ACT_CLIP_INIT, device=state["latent"].device))

    def quant_buffers(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.buffer_names}

    def quantized_weight(self) -> Tensor:
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

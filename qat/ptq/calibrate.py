"""The calibration engine (AutoGPTQ's loop): capture the first decoder layer's inputs, then
layer by layer: hook the linears of one sequential group, accumulate H = 2/N·XᵀX, quantize,
write the quantized weights back, and feed the next group (and the next layer) from the
already-quantized ones. One layer's activations are held at a time.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.models.arch import architecture, decoder_layers

log = logging.getLogger(__name__)

class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, calib: Tensor) -> tuple[list[Tensor], dict]:
    """Hidden states entering layer 0 for each sample, and layer 0's keyword arguments."""
    inputs, kwargs = [], {}

    def hook(_module, args, kw):
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for sample in calib:
            try:
                model(sample.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    return inputs, kwargs


def run_layer(layer: nn.Module, x: Tensor, kwargs: dict) -> Tensor:
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def feed_inputs(layer: nn.Module, sinks: dict[nn.Module, Any], inputs: list[Tensor], kwargs: dict) -> list[Tensor]:
    """Run `layer` on every input; each module in `sinks` hands its input to `sink.add`. Returns the
    layer's outputs."""
    hooks = [m.register_forward_hook(lambda _m, inp, _out, sink=sink: sink.add(inp[0])) for m, sink in sinks.items()]
    try:
        return [run_layer(layer, x, kwargs) for x in inputs]
    finally:
        for h in hooks:
            h.remove()


class HessianAccumulator:
    """Running H = 2/N·Σ xᵀx in fp32 over every token a linear sees."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * math.sqrt(2 / self.n)
        self.H += x.t() @ x


QuantizeFn = Callable[[str, nn.Linear, Tensor], dict[str, Tensor]]


@torch.no_grad()
def sequential_quantize(model: nn.Module, calib: Tensor, skip: list[str], quantize: QuantizeFn,
                        fake_quant: Callable[[dict[str, Tensor]], Tensor],
                        true_sequential: bool = True) -> tuple[dict, list[dict]]:
    """Run the loop; `quantize(name, linear, H)` returns the layer's state, `fake_quant(state)`
    the weight the next groups must see. Returns (states by full name, per-layer error rows).
    `true_sequential=False`: one pass per layer collects every linear's Hessian from the fp
    layer (GPTQ's original order; about 2.5x fewer layer forwards, later groups do not see
    the earlier groups' quantization)."""
    groups = [list(g.linears) for g in architecture(model).groups]  # the linears that see the same input
    if not true_sequential:
        groups = [[name for group in groups for name in group]]
    prefix, layers = decoder_layers(model)
    inputs, kwargs = capture_layer0_inputs(model, layers, calib)
    states, errors = {}, []
    for li, layer in enumerate(tqdm(layers, desc="calibrate layers", leave=False)):
        for group in groups:
            names = [n for n in group if not any(s in f"{prefix}.{li}.{n}" for s in skip)]
            linears = {n: layer.get_submodule(n) for n in names}
            acc = {n: HessianAccumulator(m.in_features, m.weight.device) for n, m in linears.items()}
            feed_inputs(layer, {m: acc[n] for n, m in linears.items()}, inputs, kwargs)
            for n, lin in linears.items():
                full = f"{prefix}.{li}.{n}"
                H, W = acc[n].H, lin.weight.float()
                state = quantize(full, lin, H)
                Q = fake_quant(state).float()
                D = W - Q
                rel = float((D @ H * D).sum() / (W @ H * W).sum().clamp_min(1e-12))
                errors.append({"layer": full, "rel_output_error": rel})
                lin.weight.copy_(Q.to(lin.weight.dtype))
                states[full] = state
        inputs = [run_layer(layer, x, kwargs) for x in inputs]
    return states, errors

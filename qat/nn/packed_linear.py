"""Inference form: a linear that stores only packed tensors and runs through qat.kernels ops."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qat.methods.base import Method
from qat.nn.qat_linear import QATLinear, set_submodule
from qat.quant.activations import fake_quant_act
from qat.quant.bits import tensor_bits


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # made under torch.inference_mode: no version counter (and read-only outside it)
        return -1


class PackedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, method: Method,
                 packed: dict[str, Tensor], bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.packed_names = list(packed)
        for name, t in packed.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        # 0 elements under the plain weight's name: transformers without qat refuses the export
        # loudly (size mismatch) instead of filling the layer with random weights (qat/hf.py)
        self.register_buffer("weight", torch.empty(0, device=next(iter(packed.values())).device))
        self._kernel_tensors: dict[str, Tensor] = {}  # stored + derived, as the kernels read them
        self._derived_from: tuple | None = None  # (device, [(storage, version) per stored tensor])
        self._cpu_forward = None  # Method.cpu_forward of the kernel tensors, where the method has one

    def packed(self) -> dict[str, Tensor]:
        """The stored tensors (what the export holds and the bits count)."""
        return {name: getattr(self, name) for name in self.packed_names}

    def kernel_tensors(self) -> dict[str, Tensor]:
        """The stored tensors plus those the method derives from them (Method.derived), derived on
        first use, not at construction: transformers builds the layer with empty tensors and loads
        the stored ones afterwards. Derived again only when a stored tensor changes (loaded in
        place, moved to another device): the key is each tensor's storage and version. The dict is
        shared between calls: read it, do not modify it."""
        stored = [self._buffers[name] for name in self.packed_names]  # every forward: kept lean
        key = (stored[0].device, [(t.data_ptr(), _version(t)) for t in stored])
        if key != self._derived_from:
            packed = self.packed()
            self._kernel_tensors = {**packed, **self.method.derived(packed, self.in_features)}
            if "input_scale" in packed:  # fp32 once: most inputs are fp32, and this runs every forward
                self._kernel_tensors["input_scale"] = packed["input_scale"].float()
            on_cpu = stored[0].device.type == "cpu" and self.method.act_bits >= 16
            self._cpu_forward = self.method.cpu_forward(self._kernel_tensors, self.in_features) if on_cpu else None
            self._derived_from = key
        return self._kernel_tensors

    def forward(self, x: Tensor) -> Tensor:
        tensors = self.kernel_tensors()
        y = None
        if self._cpu_forward is not None and x.is_cpu and not torch.compiler.is_compiling():
            y = self._cpu_forward(x)  # the layer's tensors bound once: decode-sized calls are Python-bound
        if y is None:
            y = self._packed_linear(x, tensors)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _packed_linear(self, x: Tensor, tensors: dict[str, Tensor]) -> Tensor:
        if "input_scale" in tensors:  # smoothing's per-channel factor (stored fp16)
            s = tensors["input_scale"]
            x = x / (s if s.dtype == x.dtype else s.to(x.dtype))
        if self.method.act_bits < 16 and not self.method.packs_activations:
            x = fake_quant_act(x, self.method.act_bits, self.act_clip)  # real per-token INT-k values
        return self.method.packed_linear(x, tensors, self.in_features)

    def storage_bits(self) -> int:
        """Every bit this layer stores for its weight (the bias is not part of the weight)."""
        return tensor_bits(self.packed().values())

    def extra_repr(self) -> str:
        bpw = self.storage_bits() / (self.in_features * self.out_features)
        return f"in={self.in_features}, out={self.out_features}, {bpw:.3f} bits/weight"


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """QATLinear -> PackedLinear, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLinear):
            packed = m.method.pack(m.weight.detach(), m.quant_buffers())
            if m.method.act_bits < 16:
                packed["act_clip"] = torch.sigmoid(m.act_clip.detach()).float().reshape(1)
            if m.input_scale is not None:
                packed["input_scale"] = m.input_scale.half()
            bias = None if m.bias is None else m.bias.detach().clone()
            set_submodule(model, name, PackedLinear(m.in_features, m.out_features, m.method, packed, bias))
    return model


def bits_report(model: nn.Module) -> dict[str, float]:
    """Storage bits per quantized weight, counted from what the PackedLinears store."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not layers:
        return {}
    n = sum(m.in_features * m.out_features for m in layers)
    weight = sum(m.method.packed_weight_bits(m.packed(), m.out_features, m.in_features) for m in layers)
    return {"weight": weight / n, "storage": sum(m.storage_bits() for m in layers) / n,
            "quantized_weights": n}


def layer_stats_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """Each figure of the methods' layer_stats over every grouping of the model: {name: {min, mean}}."""
    values: dict[str, list[Tensor]] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            for key, v in m.method.layer_stats(m.packed(), m.in_features).items():
                values.setdefault(key, []).append(v.reshape(-1).float())
    return {key: {"min": float(torch.cat(v).min()), "mean": float(torch.cat(v).mean())} for key, v in values.items()}

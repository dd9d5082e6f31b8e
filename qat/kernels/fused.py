"""PB-LLM's training-form weight in one C++ pass on the CPU, forward and STE backward.

The pure-torch form (`PartialBinary.fake_quant_reference`: mean |w|, sign, scale, dequantize the
salient codes, merge; autograd through each) makes about ten passes over every weight in the
forward and as many in the backward. This form computes alpha* with the same torch reduction as
the reference (so the fake-quant, packed and exported weights agree bit for bit), then one C++
pass builds the weight and one pass per row computes its gradient. The forward equals the
reference exactly; the gradient equals it up to the order of one row sum (tests/test_methods.py).
Used for fp32 CPU weights with one alpha per row when the CPU extension builds
(`QAT_KERNELS=reference`: never).
Measured: an fp32 QAT step of the embedded default (2 x 256 tokens, KL to the teacher) on a 2-core
Zen 3, 11.25 -> 9.0 s; the weight's backward 3.8 -> 0.35 ms on a 1536 x 576 layer.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qat.kernels.build import cpu_extension_or_none
from qat.quant.binarize import optimal_alpha


def fused_extension(w: Tensor, group_size: int):
    """The CPU extension where the fused form applies to this weight, else None."""
    plain = type(w) in (torch.Tensor, torch.nn.Parameter)  # not a DTensor shard or a fake tensor
    if not plain or w.device.type != "cpu" or w.dtype != torch.float32 or group_size not in (0, None):
        return None
    return cpu_extension_or_none()  # built on first use (cached); None without a compiler


class _PartialBinarySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor | None, mask: Tensor, codes: Tensor, scale: Tensor,
                zero: Tensor, clip: float | None, ext) -> Tensor:
        learned = alpha is not None
        w = w.contiguous()
        if not learned:  # alpha* = mean |w| over the binarized entries: the reference's own reduction
            alpha = optimal_alpha(w, ~mask)
        alpha_r = alpha.to(torch.float16).float().reshape(-1)  # what the packed layer stores
        if codes is None:  # no salient part (rtn_binary): the kernels skip it
            mask = codes = scale = zero = torch.empty(0)
        ctx.save_for_backward(w, mask, alpha_r)
        ctx.ext, ctx.clip, ctx.learned, ctx.alpha_shape = ext, clip, learned, alpha.shape
        return ext.partial_binary_fake_quant(w, mask, codes, scale, zero, alpha_r)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, mask, alpha_r = ctx.saved_tensors
        clip = -1.0 if ctx.clip is None else float(ctx.clip)
        grad_w, grad_alpha = ctx.ext.partial_binary_ste_grad(grad, w, mask, alpha_r, clip, not ctx.learned)
        grad_alpha = grad_alpha.reshape(ctx.alpha_shape) if ctx.learned else None
        return grad_w, grad_alpha, None, None, None, None, None, None


def partial_binary_fused(w: Tensor, buffers: dict[str, Tensor], clip: float | None, ext,
                         salient: bool = True) -> Tensor:
    """The fake-quantized weight of a PB-LLM layer with `ext`'s kernels: the salient part from
    `buffers` (salient=False: none, rtn_binary), `buffers["alpha"]` when alpha is learned."""
    codes = buffers["salient_codes"].contiguous() if salient else None
    scale, zero = (buffers["salient_scale"], buffers["salient_zero"]) if salient else (None, None)
    mask = buffers["salient_mask"].contiguous()
    return _PartialBinarySTE.apply(w, buffers.get("alpha"), mask, codes, scale, zero, clip, ext)

"""PTQ initializers: the state each quantized layer starts QAT from.

`rtn`: data-free; the method's own init_state on the fp weights (for PB-LLM: magnitude
salient mask, k-bit salient values, latent = fp weights so the binary part is sign·alpha*).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.errors import check_choice
from qat.methods.base import Method
from qat.nn.qat_linear import quantizable_linears

INITIALIZERS = ["rtn"]


@torch.no_grad()
def initialize(model: nn.Module, method: Method, init: str, skip: list[str],
               calibration: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """Per quantized layer name, the state QATLinear is built from."""
    check_choice("init", init, INITIALIZERS)
    if not method.quantizes:
        return {}
    layers = quantizable_linears(model, skip)
    return {name: method.init_state(lin.weight.detach().float())
            for name, lin in tqdm(layers, desc=f"init={init}", leave=False)}

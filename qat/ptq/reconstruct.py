"""Block-wise reconstruction (EfficientQAT's Block-AP idea) between the PTQ seed and end-to-end QAT.

Decoder block by decoder block: the quantized block (QATLinears, fake-quantized through the
STE) is trained to reproduce the fp block's output on the calibration samples. The fp block
sees the fp stream (its own previous outputs); the quantized block sees the quantized stream
(the outputs of the already reconstructed blocks), so each block also learns to correct the
error that reached it. Only the method's latent weights train (scales stay analytic, frozen
buffers stay frozen); one block's activations are held at a time, as in the calibration loop.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qat.errors import QATError
from qat.models.arch import decoder_layers
from qat.nn.qat_linear import QATLinear
from qat.ptq.calibrate import capture_layer0_inputs, run_layer

log = logging.getLogger(__name__)


def block_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The latent weights (and biases) of the block's quantized linears."""
    return [p for m in block.modules() if isinstance(m, QATLinear) for p in m.parameters()]


def relative_error(block: nn.Module, inputs: list[Tensor], targets: list[Tensor], kwargs: dict) -> float:
    with torch.no_grad():
        num = sum(float((run_layer(block, x, kwargs) - y).pow(2).sum()) for x, y in zip(inputs, targets))
    return num / max(sum(float(y.pow(2).sum()) for y in targets), 1e-30)


def reconstruct_blocks(student: nn.Module, teacher: nn.Module, calib: Tensor, epochs: int, lr: float,
                       seed: int = 0, bf16: bool = False) -> list[dict]:
    """Train each decoder block of `student` (already prepared with QATLinears) to match
    `teacher`'s (the fp model's) block outputs on `calib` [n, seq_len]: `epochs` passes of Adam
    over the samples (batch 1, shuffled, cosine lr). `bf16`: the student block's forward under
    bf16 autocast (targets, loss and weights stay fp32). Returns per-block relative output
    errors before and after."""
    if epochs < 0 or lr <= 0:
        raise QATError(f"block reconstruction needs epochs >= 0 and lr > 0; got epochs={epochs}, lr={lr}")
    _, s_layers = decoder_layers(student)
    _, t_layers = decoder_layers(teacher)
    q_inputs, kwargs = capture_layer0_inputs(student, s_layers, calib)
    fp_inputs = [x.clone() for x in q_inputs]  # embeddings are not quantized: the same start
    g = torch.Generator().manual_seed(seed)
    report = []
    for li, block in enumerate(tqdm(s_layers, desc="reconstruct blocks", leave=False)):
        with torch.no_grad():
            targets = [run_layer(t_layers[li], x, kwargs) for x in fp_inputs]
        before = relative_error(block, q_inputs, targets, kwargs)
        params = block_parameters(block)
        if params and epochs > 0:
            frozen = [p for p in block.parameters() if p.requires_grad and all(p is not q for q in params)]
            for p in frozen:
                p.requires_grad_(False)
            opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.95))
            steps = epochs * len(q_inputs)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 0.1)
            for _ in range(epochs):
                for i in torch.randperm(len(q_inputs), generator=g).tolist():
                    with torch.autocast(q_inputs[i].device.type, dtype=torch.bfloat16, enabled=bf16):
                        out = run_layer(block, q_inputs[i], kwargs)
                    loss = F.mse_loss(out.float(), targets[i])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            for p in frozen:
                p.requires_grad_(True)
        after = relative_error(block, q_inputs, targets, kwargs)
        report.append({"block": li, "rel_error_before": before, "rel_error_after": after})
        log.info("block %d: relative output error %.4f -> %.4f", li, before, after)
        with torch.no_grad():
            q_inputs = [run_layer(block, x, kwargs) for x in q_inputs]
        fp_inputs = targets
    return report

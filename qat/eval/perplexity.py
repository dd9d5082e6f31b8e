"""Perplexity as GPTQ measures it (methods.md §7)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qat.errors import QATError


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, max_windows: int | None = None,
               desc: str = "perplexity") -> tuple[float, int]:
    """Cut `tokens` into non-overlapping windows of seq_len, mean next-token NLL over all
    windows, exp. Returns (ppl, number of predicted tokens)."""
    if seq_len <= 0:
        raise QATError(f"eval.seq_len={seq_len} must be a positive number of tokens")
    n = tokens.numel() // seq_len
    if max_windows:
        n = min(n, int(max_windows))
    if n == 0:
        raise QATError(f"eval.seq_len={seq_len} is longer than the eval split ({tokens.numel()} tokens)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in tqdm(range(n), desc=desc, leave=False):
        x = tokens[i * seq_len: (i + 1) * seq_len].to(device).unsqueeze(0)
        logits = model(x).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += loss.item()
        count += seq_len - 1
    model.train(was_training)
    return math.exp(nll / count), count

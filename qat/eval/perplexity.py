"""Perplexity as GPTQ measures it (methods.md §7)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qat.errors import QATError

log = logging.getLogger(__name__)
PPL_CACHE_VERSION = 1  # bump when perplexity() changes what it measures: cached values are then not reused


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


def cached_perplexity(model: nn.Module, tokens: torch.Tensor, seq_len: int, max_windows: int | None,
                      compute: Callable[[], tuple[float, int]], cache: Path | None) -> tuple[float, int]:
    """`compute()`'s (ppl, count), cached as JSON under `cache` keyed by the model's weights
    fingerprint, the tokens, the windows and the dtype/device, so that the same fp model is not
    measured again on the same text (a minute of every headline run). cache None: no cache."""
    if cache is None:
        return compute()
    from qat.ptq.initializers import weights_fingerprint

    p = next(model.parameters())
    config = getattr(model, "config", None)
    config = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
    blob = json.dumps([PPL_CACHE_VERSION, weights_fingerprint(model), config,
                       hashlib.sha1(tokens.numpy().tobytes()).hexdigest(), seq_len, max_windows, str(p.dtype),
                       p.device.type])
    path = cache / f"{hashlib.sha1(blob.encode()).hexdigest()[:20]}.json"
    try:
        hit = json.loads(path.read_text())
        log.info("ppl from cache %s", path)
        return float(hit["ppl"]), int(hit["count"])
    except (OSError, ValueError, KeyError):
        pass  # no entry (or a damaged one): measure
    value, count = compute()
    try:
        from qat.io import atomic_write_bytes

        atomic_write_bytes(path, json.dumps({"ppl": value, "count": count}).encode())
    except OSError as e:  # a cache is an optimisation: a full or read-only disk must not end the run
        log.warning("perplexity cache not written (%s)", e)
    return value, count

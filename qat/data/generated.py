"""Training text the fp model writes itself (LLM-QAT's data-free distillation, arXiv 2305.17888):
each sequence starts from one token drawn uniformly from the vocabulary and continues by sampling
the model's own next-token distribution (temperature 1, no top-k / top-p). Mixed into QAT's
batches (`data.generated_fraction`), it asks the student to match the teacher on what the
teacher itself would say, in every domain it knows, not only on the training corpus's one.
Cached per (weights' fingerprint, count, length, seed, batch, precision) like the PTQ seed."""
from __future__ import annotations

import hashlib
import io
import logging
import math

import torch
from torch import nn

from qat.fetch import cache_dir
from qat.io import atomic_write_bytes

log = logging.getLogger(__name__)
GENERATED_CACHE_VERSION = 1


def generated_count(total_samples: int, fraction: float) -> int:
    """How many generated sequences a run of total_samples training samples reads."""
    return math.ceil(total_samples * fraction) if fraction > 0 else 0


def is_generated(g: int, fraction: float) -> tuple[bool, int]:
    """Sample g of the run: (generated?, its index in the generated pool or in the corpus stream).
    The generated ones are spread evenly (sample g is generated when floor((g+1)·f) passes an
    integer), so any stretch of the run holds the same fraction."""
    k0, k1 = math.floor(g * fraction), math.floor((g + 1) * fraction)
    return (k1 > k0, k0) if k1 > k0 else (False, g - k0)


@torch.no_grad()
def sample_sequences(model: nn.Module, n: int, seq_len: int, seed: int, vocab_size: int,
                     batch: int = 32) -> torch.Tensor:
    """n sequences [n, seq_len] (int64) sampled from the model, batch by batch."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    # generate() samples from the global generator: seeded per batch, and restored afterwards so that
    # the rest of the run sees the same random state whether or not the pool came from the cache
    with torch.random.fork_rng(devices=[]):
        for i in range(0, n, batch):
            b = min(batch, n - i)
            first = torch.randint(0, vocab_size, (b, 1), generator=g)
            torch.manual_seed(seed * 1000003 + i)
            # every sampling knob explicit: none comes from the model's own generation_config
            seqs = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, temperature=1.0,
                                  top_k=0, top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                  max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=0)
            out.append(seqs[:, :seq_len].cpu())
            log.info("generated %d / %d training sequences of %d tokens", i + b, n, seq_len)
    model.train(was_training)
    return torch.cat(out)


def cached_generated(model: nn.Module, fingerprint: str, n: int, seq_len: int, seed: int,
                     vocab_size: int, batch: int = 32, bf16: bool = False) -> torch.Tensor:
    """sample_sequences (under bf16 autocast on the CPU when bf16), cached under the cache dir
    (written to a temp name, then renamed)."""
    # the batch and the precision are in the key: each batch draws its own first tokens and samples,
    # and bf16 arithmetic samples other tokens
    key = hashlib.sha1(f"{GENERATED_CACHE_VERSION}|{fingerprint}|{n}|{seq_len}|{seed}|{vocab_size}|{batch}|"
                       f"{'bf16' if bf16 else 'fp32'}".encode())
    path = cache_dir() / "generated" / f"{key.hexdigest()[:20]}.pt"
    if path.exists():
        try:
            seqs = torch.load(path, weights_only=True)
            if seqs.shape == (n, seq_len):
                return seqs
        except Exception:  # a corrupt cache entry is generated again
            log.warning("generated-text cache %s unreadable: generating again", path)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        seqs = sample_sequences(model, n, seq_len, seed, vocab_size, batch)
    buf = io.BytesIO()
    torch.save(seqs, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return seqs

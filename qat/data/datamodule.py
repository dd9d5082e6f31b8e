"""Tokenized splits, packed into seq_len blocks; train/val loaders and a seeded calibration set."""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from qat.data.corpora import load_corpus
from qat.data.generated import is_generated
from qat.errors import QATError
from qat.fetch import cache_dir
from qat.io import atomic_write_bytes
from qat.models.load import encode


def tokenize_splits(cfg: dict, tokenizer: Any, tokenizer_name: str) -> dict[str, torch.Tensor]:
    """Each split as one 1-D int64 token tensor (documents joined by blank lines), cached under a
    key of the text's content (sha1 of every split's documents), the config and the tokenizer:
    a replaced or edited file can never be answered with stale tokens."""
    corpus = load_corpus(cfg)
    text = hashlib.sha1()
    for split in sorted(corpus):
        text.update(split.encode() + b"\0")
        for doc in corpus[split]:
            text.update(doc.encode() + b"\0")
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    blob = json.dumps([cfg, tokenizer_name, vocab, text.hexdigest()], sort_keys=True, default=str)
    key = hashlib.sha1(blob.encode()).hexdigest()[:16]
    path = cache_dir() / "tokens" / f"{cfg.get('name', 'corpus')}-{key}.pt"
    if path.exists():
        try:
            return torch.load(path)
        except Exception:
            raise QATError(f"cached token file {path} is corrupt; delete it to rebuild") from None
    tokens = {name: torch.tensor(encode(tokenizer, "\n\n".join(docs)), dtype=torch.int64)
              for name, docs in corpus.items()}
    buf = io.BytesIO()
    torch.save(tokens, buf)
    atomic_write_bytes(path, buf.getvalue())
    return tokens


def blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


class StepIndexedBlocks(Dataset):
    """Sample j is block perm_p[g % n] with g = start + j, p = g // n, perm_p seeded by (seed, p):
    a reshuffle every pass over the blocks, reproducible from any starting point. With generated
    sequences (data.generated_fraction), that fraction of the run's samples, spread evenly, are
    the generated pool's in order, and the rest the corpus stream above."""

    def __init__(self, data: torch.Tensor, seed: int, start: int, length: int,
                 generated: torch.Tensor | None = None, fraction: float = 0.0):
        self.data, self.seed, self.start, self.length = data, seed, start, length
        self.generated, self.fraction = generated, fraction if generated is not None else 0.0
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> tuple[torch.Tensor]:
        g = self.start + j
        if self.fraction:
            generated, g = is_generated(g, self.fraction)
            if generated:
                if g >= self.generated.shape[0]:  # pipeline.generate_text sizes the pool for the whole run
                    raise IndexError(f"generated sample {g} of a pool of {self.generated.shape[0]}")
                return (self.generated[g],)
        n = self.data.shape[0]
        p = g // n
        if p not in self._perms:
            self._perms[p] = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + p))
        return (self.data[self._perms[p][g % n]],)


class LMDataModule(L.LightningDataModule):
    def __init__(self, cfg: dict, tokenizer: Any, tokenizer_name: str, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = cfg, seed
        self.generated: torch.Tensor | None = None  # data.generated_fraction's pool (pipeline.generate_text)
        self.tokens = tokenize_splits(cfg, tokenizer, tokenizer_name)
        self.seq_len = int(cfg["seq_len"])
        if self.seq_len <= 0:
            raise QATError(f"data.seq_len={self.seq_len} must be a positive number of tokens")
        if self.tokens["train"].numel() < self.seq_len:
            raise QATError(f"data.seq_len={self.seq_len} is longer than the training split "
                           f"({self.tokens['train'].numel()} tokens)")

    @property
    def test_tokens(self) -> torch.Tensor:
        return self.tokens["test"]

    def train_dataloader(self) -> DataLoader:
        """Resumable: batch i of the run is a function of (seed, i) alone, and a resumed run
        starts at the batch after the restored global step. The loader always has the whole
        run's length: Lightning restores its batch counter and ends the epoch at len(loader);
        a shorter loader would end it early and replay its start (measured: a resume from
        step 10 of 30 diverged at step 21)."""
        # under DDP the distributed sampler deals the samples out: rank r takes every world-th,
        # so a step consumes batch·world samples and the loader spans the run for all ranks
        batch = int(self.cfg["batch_size"])
        start, world = 0, 1
        if self.trainer is not None:
            world = self.trainer.world_size
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches * batch * world
        total = max(int(self.cfg.get("total_batches", 1)), 1) * batch * world
        data = StepIndexedBlocks(blocks(self.tokens["train"], self.seq_len), self.seed, start, total,
                                 self.generated, float(self.cfg.get("generated_fraction", 0.0)))
        sampler = None
        if world > 1:  # our own, unshuffled (Lightning's would reshuffle): step k is samples k·world·batch...
            sampler = DistributedSampler(data, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=batch, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        b = blocks(self.tokens["validation"], self.seq_len)[: int(self.cfg.get("val_blocks", 8))]
        return DataLoader(TensorDataset(b), batch_size=int(self.cfg["batch_size"]))

    def check_windows(self, n_samples: int, seq_len: int, key: str) -> None:
        """The training split must hold n_samples windows of seq_len tokens (a huge count hung)."""
        train = self.tokens["train"]
        if train.numel() <= seq_len:
            raise QATError(f"calibration seq_len={seq_len} is longer than the training split")
        available = train.numel() // seq_len
        if n_samples > available:
            raise QATError(f"{key}={n_samples}: the training split holds {available} windows of {seq_len} "
                           f"tokens ({train.numel()} tokens); allowed 1..{available}")

    def calibration(self, n_samples: int, seq_len: int, key: str = "init.n_samples") -> torch.Tensor:
        """n random windows of the training split (seeded): [n, seq_len]. `key`: the knob that asked."""
        self.check_windows(n_samples, seq_len, key)
        train = self.tokens["train"]
        g = torch.Generator().manual_seed(self.seed)
        starts = torch.randint(0, train.numel() - seq_len, (n_samples,), generator=g)
        return torch.stack([train[s: s + seq_len] for s in starts.tolist()])

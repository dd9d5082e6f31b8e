"""Bit packing: 32 booleans per int32 along the last dim (bit j of word w = column 32·w + j)."""
from __future__ import annotations

import torch
from torch import Tensor


def _shifts(device: torch.device) -> Tensor:
    # built per call, never at import: a module imported inside transformers' meta-device context
    # (from_pretrained) would otherwise hold a constant on the meta device
    return torch.arange(32, dtype=torch.int64, device=device)


def packed_words(n: int) -> int:
    return (n + 31) // 32


def pack_bits(bits: Tensor) -> Tensor:
    """bool [..., n] -> int32 [..., ceil(n/32)]; padding bits are 0."""
    n = bits.shape[-1]
    pad = packed_words(n) * 32 - n
    b = torch.nn.functional.pad(bits.to(torch.int64), (0, pad)).reshape(*bits.shape[:-1], -1, 32)
    words = (b << _shifts(b.device)).sum(dim=-1)
    # two's complement into the int32 range (bit 31 set -> negative)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words: Tensor, n: int) -> Tensor:
    """int32 [..., ceil(n/32)] -> bool [..., n]."""
    w = words.to(torch.int64).unsqueeze(-1)
    bits = ((w >> _shifts(words.device)) & 1).bool()
    return bits.reshape(*words.shape[:-1], -1)[..., :n]


def _bit_rows(words: Tensor, n: int, rows_per_chunk: int):
    """uint8 [r, n] bits of int32 words [rows, ceil(n/32)], yielded a few rows at a time through one
    byte per bit: unpacking a whole layer at once (int64 per bit) grew a model's resident memory by
    0.9 GB that the allocator kept."""
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    for r0 in range(0, words.shape[0], rows_per_chunk):
        byts = words[r0:r0 + rows_per_chunk].contiguous().view(torch.uint8)  # little endian: byte b = columns 8b..
        yield ((byts.unsqueeze(-1) >> shifts) & 1).reshape(byts.shape[0], -1)[:, :n]


def set_columns(words: Tensor, n: int, rows_per_chunk: int = 64) -> Tensor:
    """The column of every set bit of int32 [rows, ceil(n/32)], row by row (row-major, as
    `mask.nonzero()` orders them), int64."""
    cols = [bits.nonzero()[:, 1] for bits in _bit_rows(words, n, rows_per_chunk)]
    return torch.cat(cols) if cols else words.new_empty(0, dtype=torch.int64)


def row_popcounts(words: Tensor, rows_per_chunk: int = 64) -> Tensor:
    """Set bits per row of int32 [rows, words], int64 (padding bits are 0)."""
    counts = [bits.sum(dim=-1, dtype=torch.int64) for bits in _bit_rows(words, 32 * words.shape[-1], rows_per_chunk)]
    return torch.cat(counts) if counts else words.new_empty(0, dtype=torch.int64)

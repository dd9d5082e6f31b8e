"""ggml's block formats, written from the values a packed layer stores (pure numpy, no torch).

Each encoder takes integer codes and per-block fp16 scales and returns the bytes ggml reads,
one row of blocks per matrix row ([rows, blocks · block_bytes], uint8). They are exact: the
values llama.cpp dequantizes are the codes and the fp16 scales (and offsets) given, bit for bit.

  Q1_0  128 weights {fp16 d; uint8 qs[16]}            weight j = bit j%8 of qs[j/8]: 1 → +d, 0 → −d
  Q4_0   32 weights {fp16 d; uint8 qs[16]}            (q − 8)·d; j in the low nibble of qs[j], j+16 high
  Q4_1   32 weights {fp16 d; fp16 m; uint8 qs[16]}    q·d + m; nibbles as Q4_0
  Q8_0   32 weights {fp16 d; int8 qs[32]}             q·d
"""
from __future__ import annotations

import numpy as np

BLOCK = {"Q1_0": 128, "Q4_0": 32, "Q4_1": 32, "Q8_0": 32}


def _half_bytes(d: np.ndarray) -> np.ndarray:
    """fp16 values [rows, blocks] -> their little-endian bytes [rows, blocks, 2]."""
    return np.ascontiguousarray(d, dtype="<f2").view(np.uint8).reshape(*d.shape, 2)


def _blocks(rows: int, *parts: np.ndarray) -> np.ndarray:
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """codes 0..15 [rows, blocks, 32] -> [rows, blocks, 16]: j low, j + 16 high."""
    q = q.astype(np.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def block_scales(scales: np.ndarray, n: int, block: int) -> np.ndarray | None:
    """Per-group scales [rows, groups] (groups of n / groups columns) as one scale per block of
    `block` columns, or None when a block would straddle two groups (or n is not whole blocks)."""
    rows, groups = scales.shape
    if n % block or n % groups or (n // groups) % block:
        return None
    return np.repeat(scales, (n // groups) // block, axis=1)


def q1_0(bits: np.ndarray, d: np.ndarray) -> np.ndarray:
    """bits bool [rows, n] (True: +d), d fp16 [rows, n/128]."""
    rows, n = bits.shape
    b = bits.reshape(rows, n // 128, 16, 8).astype(np.uint8)
    qs = (b << np.arange(8, dtype=np.uint8)).sum(axis=-1, dtype=np.uint8)
    return _blocks(rows, _half_bytes(d), qs)


def q4_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes 0..15 [rows, n] (value (q − 8)·d), d fp16 [rows, n/32]."""
    rows, n = codes.shape
    return _blocks(rows, _half_bytes(d), _nibbles(codes.reshape(rows, n // 32, 32)))


def q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """codes 0..15 [rows, n] (value q·d + m), d and m fp16 [rows, n/32]."""
    rows, n = codes.shape
    return _blocks(rows, _half_bytes(d), _half_bytes(m), _nibbles(codes.reshape(rows, n // 32, 32)))


def q8_0(codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes int8 [rows, n] (value q·d), d fp16 [rows, n/32]."""
    rows, n = codes.shape
    qs = codes.astype(np.int8).reshape(rows, n // 32, 32).view(np.uint8)
    return _blocks(rows, _half_bytes(d), qs)

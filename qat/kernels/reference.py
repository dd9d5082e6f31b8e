"""Pure-torch reference implementations of the packed ops: any device, the tests' oracle."""
from __future__ import annotations

import torch
from torch import Tensor

from qat.quant.kbit import dequantize_kbit, unpack_nibbles
from qat.quant.packing import row_popcounts, set_columns, unpack_bits

SALIENT_NONE, SALIENT_CSR, SALIENT_BITMAP = 0, 1, 2
# the CPU kernels' layout of a salient part, derived from either stored format (never stored): rows
# in blocks of 16 (one per lane), columns in chunks of 32; slot_ptr [blocks·words + 1] int32 counts
# the slots of each (block, chunk); a slot is 16 lanes of (column in the chunk, code), column 255
# where that row has no further entry in the chunk
SALIENT_SLOTS = 3
SLOT_ROWS, SLOT_COLS, SLOT_PAD = 16, 32, 255


def salient_slots(rows: Tensor, cols: Tensor, codes: Tensor, n_rows: int, n_words: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(slot_ptr, slot_cols uint8, slot_codes) of the salient entries (rows, cols, codes) given
    row-major (each row's columns ascending), as the CPU kernel reads them."""
    cols = cols.to(torch.int64)
    n_keys = -(-n_rows // SLOT_ROWS) * n_words
    key = (rows // SLOT_ROWS) * n_words + cols // SLOT_COLS  # (block, chunk)
    group = key * SLOT_ROWS + rows % SLOT_ROWS  # (block, chunk, lane)
    order = torch.sort(group, stable=True).indices  # stable: a group's entries keep their column order
    g = group[order]
    per_group = torch.bincount(group, minlength=n_keys * SLOT_ROWS)
    starts = torch.cumsum(per_group, 0) - per_group
    rank = torch.arange(g.numel(), device=g.device) - starts[g]
    slots = per_group.view(n_keys, SLOT_ROWS).amax(dim=1)
    slot_ptr = torch.cat([slots.new_zeros(1), torch.cumsum(slots, 0)])
    at = (slot_ptr[g // SLOT_ROWS] + rank) * SLOT_ROWS + g % SLOT_ROWS
    n_slots = int(slot_ptr[-1])
    slot_cols = torch.full((n_slots * SLOT_ROWS,), SLOT_PAD, dtype=torch.uint8, device=cols.device)
    slot_cols[at] = (cols[order] % SLOT_COLS).to(torch.uint8)
    slot_codes = torch.zeros(n_slots * SLOT_ROWS, dtype=codes.dtype, device=codes.device)
    slot_codes[at] = codes[order]
    return slot_ptr.to(torch.int32), slot_cols, slot_codes


def blocked_signs(signs: Tensor) -> Tensor:
    """The sign words as [ceil(N/16), W, 16] (int32, zero rows padding the last block): the 16 rows
    of a block's word w side by side, what the CPU table kernel reads in one load (a gather
    from the row-major words meets 16 cache lines)."""
    n, w = signs.shape
    padded = torch.cat([signs, signs.new_zeros((-n) % SLOT_ROWS, w)]) if n % SLOT_ROWS else signs
    return padded.view(-1, SLOT_ROWS, w).transpose(1, 2).contiguous()


def slot_entries(slot_ptr: Tensor, slot_cols: Tensor, n_words: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, index of each entry's code in the slot codes) of a slot layout."""
    counts = (slot_ptr[1:] - slot_ptr[:-1]).long()
    key = torch.repeat_interleave(torch.arange(counts.numel(), device=slot_ptr.device), counts)
    c = slot_cols.view(-1, SLOT_ROWS).long()
    slot, lane = (c != SLOT_PAD).nonzero(as_tuple=True)
    rows = (key[slot] // n_words) * SLOT_ROWS + lane
    cols = (key[slot] % n_words) * SLOT_COLS + c[slot, lane]
    return rows, cols, slot * SLOT_ROWS + lane


def salient_positions(fmt: int, row_ptr: Tensor, positions: Tensor, n_rows: int,
                      in_features: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the salient entries, in the order their codes are stored (row-major)."""
    if fmt == SALIENT_CSR:
        counts = (row_ptr[1:] - row_ptr[:-1]).long()
        cols = positions.to(torch.int64) & 0xFFFF  # uint16 stored in int16
    else:  # the bitmap, row by row: no dense mask of a large layer
        counts, cols = row_popcounts(positions), set_columns(positions, in_features)
    return torch.repeat_interleave(torch.arange(n_rows, device=positions.device), counts), cols


def binary_weight(
    signs: Tensor, scales: Tensor, in_features: int, fmt: int = SALIENT_NONE,
    row_ptr: Tensor | None = None, positions: Tensor | None = None, codes: Tensor | None = None,
    sal_scale: Tensor | None = None, sal_zero: Tensor | None = None,
) -> Tensor:
    """The dense fp32 weight [N, K] a packed binary (+salient) layer stands for."""
    n = signs.shape[0]
    s = unpack_bits(signs, in_features).float() * 2 - 1
    alpha = scales.float().repeat_interleave(in_features // scales.shape[1], dim=1)
    w = alpha * s
    if fmt == SALIENT_SLOTS:
        rows, cols, at = slot_entries(row_ptr, positions, signs.shape[1])
        codes = codes[at]
    elif fmt != SALIENT_NONE:
        rows, cols = salient_positions(fmt, row_ptr, positions, n, in_features)
    if fmt != SALIENT_NONE:
        c = codes.to(torch.int64) & 0xFFFF
        w[rows, cols] = dequantize_kbit(c.float(), sal_scale.float()[rows], sal_zero.float()[rows])
    return w


def binary_gemm(x: Tensor, signs: Tensor, scales: Tensor, in_features: int, fmt: int = 0,
                row_ptr=None, positions=None, codes=None, sal_scale=None, sal_zero=None) -> Tensor:
    w = binary_weight(signs, scales, in_features, fmt, row_ptr, positions, codes, sal_scale, sal_zero)
    return (x.float() @ w.t()).to(x.dtype)


def w1a1x4_gemm(planes: Tensor, signs: Tensor, gbits: Tensor, scales: Tensor, wsum: Tensor,
                xs: Tensor, xz: Tensor) -> Tensor:
    """y = xs·(Σ_b 2^b·(Ŵ q_b) − xz·Ŵ1), Ŵ = sign·α_group; returns fp32 [M, N]."""
    k = signs.shape[1] * 32
    s = unpack_bits(signs, k).float() * 2 - 1
    if gbits.numel():
        g = unpack_bits(gbits, k).long()
    else:
        g = torch.zeros_like(s, dtype=torch.long)
    w = s * torch.gather(scales.float(), 1, g)
    q = sum((2**b) * unpack_bits(planes[b], k).float() for b in range(4))
    return xs.float()[:, None] * (q @ w.t() - xz.float()[:, None] * wsum.float()[None, :])


def grouped_binary_weight(signs: Tensor, group_planes: Tensor, scales: Tensor, in_features: int) -> Tensor:
    """The dense fp32 weight [N, K] of a dynamically grouped binary layer: sign·alpha[row?, id],
    id = Σ_b 2^b·plane_b; scales [1 or N, G] fp16."""
    s = unpack_bits(signs, in_features).float() * 2 - 1
    ids = group_ids_from_planes(group_planes, signs.shape[0], in_features)
    return s * torch.gather(scales.float().expand(s.shape[0], -1), 1, ids)


def group_ids_from_planes(group_planes: Tensor, rows: int, in_features: int) -> Tensor:
    """Each weight's group id [rows, in_features] (int64), id = Σ_b 2^b·plane_b."""
    ids = torch.zeros(rows, in_features, dtype=torch.long, device=group_planes.device)
    for b in range(group_planes.shape[0]):
        ids |= unpack_bits(group_planes[b], in_features).long() << b
    return ids


def grouped_binary_gemm(x: Tensor, signs: Tensor, group_planes: Tensor, scales: Tensor,
                        in_features: int) -> Tensor:
    w = grouped_binary_weight(signs, group_planes, scales, in_features)
    return (x.float() @ w.t()).to(x.dtype)


def int_row_weight(codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    """The dense fp32 weight of symmetric per-row int8 codes [N, K] (or int4 nibbles [N, K/2]:
    column 2i in the low nibble of byte i, stored as code + 8) times one scale per row."""
    c = unpack_nibbles(codes) if bits == 4 else codes
    return c.float() * scale.float()[:, None]


def int_row_gemm(x: Tensor, codes: Tensor, scale: Tensor, bits: int) -> Tensor:
    return (x.float() @ int_row_weight(codes, scale, bits).t()).to(x.dtype)

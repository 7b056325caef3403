"""Quantized rows: ``store.dtype: int8`` or ``int4``.

Each row is quantized block by block (one block per module, the row layout's), symmetric
round-to-nearest with one float32 scale per row and block::

    scale = max_j |x_j| / q_max          (q_max = 127 for int8, 7 for int4)
    code_j = round(x_j / scale)          in [-q_max, q_max]
    x_j ~= code_j * scale                (|error| <= scale / 2)

so every module keeps its own dynamic range (modules' gradients differ by orders of
magnitude). A shard of a quantized store holds ``rows`` as the codes (``int8``, or for
``int4`` two codes per byte, ``uint8``: column ``2j`` in the low nibble, ``2j + 1`` in the
high one, each stored as ``code + 8``) and ``scales`` (n x blocks, float32). Readers hand out
dequantized float32 rows.

The error per entry is at most half a step; with projections that whiten the gradient
(``projection: whitened``) the entries of a block are of similar size, which is where this
rounding loses least (see docs/influence.md, "Quantized storage").
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from logix.store.format import Layout
from logix.store.mapping import Source, can_map, mapped, raw_offset

QUANT_BITS = {"int8": 8, "int4": 4}


def is_quantized(dtype: str) -> bool:
    return dtype in QUANT_BITS


def q_max(dtype: str) -> int:
    return 2 ** (QUANT_BITS[dtype] - 1) - 1


def code_width(dtype: str, dim: int) -> int:
    """Bytes of codes per row."""
    return (dim + 1) // 2 if QUANT_BITS[dtype] == 4 else dim


def row_bytes(dtype: str, layout: Layout) -> int:
    """Bytes one stored row takes (codes and scales)."""
    return code_width(dtype, layout.dim) + 4 * len(layout.blocks)


def quantize(rows: torch.Tensor, layout: Layout, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, scales)`` of float ``rows`` (n x dim) as stored in a shard."""
    rows = rows.detach().to("cpu", torch.float32)
    if rows.dim() != 2 or rows.shape[1] != layout.dim:
        raise ValueError(f"rows of shape {tuple(rows.shape)} do not match the layout's {layout.dim} columns.")
    if not torch.isfinite(rows).all():
        raise ValueError("rows hold inf or NaN, which cannot be quantized; check the loss and the model.")
    top = q_max(dtype)
    n = rows.shape[0]
    codes = torch.empty(n, layout.dim, dtype=torch.int8)
    scales = torch.empty(n, len(layout.blocks), dtype=torch.float32)
    for b, block in enumerate(layout.blocks):
        x = rows[:, block.columns]
        scale = x.abs().amax(dim=1, keepdim=True) / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes[:, block.columns] = torch.round(x / safe).clamp_(-top, top).to(torch.int8)
        scales[:, b] = scale[:, 0]
    if QUANT_BITS[dtype] == 8:
        return codes.numpy(), scales.numpy()
    return pack_int4(codes.numpy()), scales.numpy()


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """``(n, dim)`` codes in [-8, 7] as ``(n, ceil(dim / 2))`` bytes."""
    n, dim = codes.shape
    if dim % 2:
        codes = np.concatenate([codes, np.zeros((n, 1), codes.dtype)], axis=1)
    biased = (codes.astype(np.int16) + 8).astype(np.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def unpack_int4(packed: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``(n, dim)`` int8 codes."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    out[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return out[:, :dim]


def dequantize(codes: np.ndarray, scales: np.ndarray, layout: Layout, dtype: str,
               columns: list[slice] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Float32 rows from ``codes`` and ``scales`` (all columns, or the ``columns`` slices in
    order), written into ``out`` when given.

    All columns of int4 rows are decoded straight into ``out`` (each nibble's ``code - 8`` converted
    to float32 in one pass per half, then each block scaled in place), a few hundred rows at a time,
    so no full-size integer temporary is made; other requests decode the wanted columns."""
    if columns is None and QUANT_BITS[dtype] == 4:
        return _dequantize_int4(codes, scales, layout, out)
    if QUANT_BITS[dtype] == 4:
        codes = unpack_int4(codes, layout.dim)
    spans = [(b, blk.columns) for b, blk in enumerate(layout.blocks)]
    wanted = [slice(0, layout.dim)] if columns is None else columns
    width = sum(c.stop - c.start for c in wanted)
    if out is None:
        out = np.empty((codes.shape[0], width), np.float32)
    at = 0
    for c in wanted:
        for b, cols in spans:  # the parts of ``c`` in each block, each with its block's scale
            lo, hi = max(c.start, cols.start), min(c.stop, cols.stop)
            if lo >= hi:
                continue
            dest = out[:, at + lo - c.start : at + hi - c.start]
            np.multiply(codes[:, lo:hi], scales[:, b : b + 1], out=dest, dtype=np.float32)
        at += c.stop - c.start
    return out


def _dequantize_int4(packed: np.ndarray, scales: np.ndarray, layout: Layout, out: np.ndarray | None) -> np.ndarray:
    n, dim = packed.shape[0], layout.dim
    if out is None:
        out = np.empty((n, dim), np.float32)
    step = max(1, (1 << 20) // max(packed.shape[1], 1))  # ~1 MB of codes per block of rows
    even, odd = (dim + 1) // 2, dim // 2
    codes, rows_all = torch.from_numpy(np.asarray(packed)), torch.from_numpy(out)  # torch: the ops use every core
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        part, rows = codes[lo:hi], rows_all[lo:hi]
        rows[:, 0::2].copy_(torch.bitwise_and(part[:, :even], 0x0F)).sub_(8)
        rows[:, 1::2].copy_(torch.bitwise_right_shift(part[:, :odd], 4)).sub_(8)
        block_scales = torch.from_numpy(np.asarray(scales[lo:hi]))
        for b, block in enumerate(layout.blocks):
            rows[:, block.columns].mul_(block_scales[:, b : b + 1])
    return out

def quantized_sources(path: Path) -> tuple[Source, Source]:
    """Where a quantized shard's codes and scales lie in its file (for :func:`read_quantized`)."""
    with h5py.File(path, "r") as fh:
        codes, scales = fh["rows"], fh["scales"]
        return (Source(path, codes.dtype, raw_offset(codes, codes.dtype, codes.shape)),
                Source(path, scales.dtype, raw_offset(scales, scales.dtype, scales.shape)))


def read_codes(sources: tuple[Source, Source], lo: int, hi: int, layout: Layout,
               dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of rows ``lo:hi`` of a quantized shard, as stored (memory maps when the
    file allows, else read through HDF5)."""
    codes_src, scales_src = sources
    if codes_src.offset is not None and scales_src.offset is not None and can_map():
        return (mapped(codes_src, lo, hi, code_width(dtype, layout.dim), False),
                mapped(scales_src, lo, hi, len(layout.blocks), False))
    with h5py.File(codes_src.path, "r") as fh:
        return fh["rows"][lo:hi], fh["scales"][lo:hi]


def read_quantized(sources: tuple[Source, Source], lo: int, hi: int, layout: Layout, dtype: str,
                   columns: list[slice] | None, out: np.ndarray) -> np.ndarray:
    """Rows ``lo:hi`` of a quantized shard, dequantized into ``out``: its codes and scales read
    through memory maps of the file (no HDF5 call, no copy), or through HDF5 when they are not
    plain arrays in it."""
    codes_src, scales_src = sources
    if codes_src.offset is not None and scales_src.offset is not None and can_map():
        codes = mapped(codes_src, lo, hi, code_width(dtype, layout.dim), False)
        scales = mapped(scales_src, lo, hi, len(layout.blocks), False)
        return dequantize(codes, scales, layout, dtype, columns, out)
    with h5py.File(codes_src.path, "r") as fh:
        return dequantize(fh["rows"][lo:hi], fh["scales"][lo:hi], layout, dtype, columns, out)

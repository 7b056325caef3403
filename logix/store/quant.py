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

import numpy as np
import torch

from logix.store.format import Layout

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
    order), written into ``out`` when given."""
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

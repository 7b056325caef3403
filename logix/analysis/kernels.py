"""The scorer's kernels: chunk sizing, block-wise float64 work on rows, the score GEMM, and
top-k merging.

Float64 work on a chunk's rows (self-influence, norms, conversions of half-precision rows)
runs a block of rows at a time in reused buffers (:class:`Scratch`), so memory stays flat in
``n_train`` whatever the chunk size.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from logix.analysis.precondition import Preconditioner
from logix.config.choices import PreconditionerType, ScoreMode
from logix.store.chunks import CodedRows

BLOCK_ELEMS = 2**20  # float64 work on rows runs in blocks of this many values (8 MB) ...
PRE_BLOCK_ELEMS = 2**22  # ... or of this many (32 MB) through a preconditioner: fewer, larger ops


def budget_chunk_rows(dim: int, n_query: int, budget_mb: float, prefetch: int) -> int:
    """Rows per chunk so that the chunks in flight and their score columns fit the budget.

    In flight: up to ``prefetch + 3`` chunks (the consumer's, the queue's, the one being
    read; 4 bytes per value at most). Per row of scores: float32 GEMM output, its float64
    copy and one normalised copy. Conversions (self-influence, float64 GEMMs, half-precision
    stores) run in fixed blocks of rows (``BLOCK_ELEMS``, ``PRE_BLOCK_ELEMS`` values), whose
    memory is set aside from the budget."""
    per_row = dim * 4 * (prefetch + 3) + n_query * (4 + 8 * 2)
    fixed = 5 * 8 * PRE_BLOCK_ELEMS  # a block, its preconditioned copy and the intermediates
    return max(1, int(max(budget_mb * 2**20 - fixed, budget_mb * 2**19) // per_row))


def block_rows(dim: int, elems: int | None = None) -> int:
    return max(1, (elems or BLOCK_ELEMS) // max(1, dim))


class Scratch:
    """Block buffers reused across the chunks of one call: no fresh multi-MB allocation per
    chunk, so the allocator's heap does not fragment and memory stays flat in ``n_train``."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def block(self, source: Tensor, dtype: torch.dtype, max_elems: int) -> Tensor:
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < min(max_elems, source.numel()):
            buffer = self._buffers[dtype] = torch.empty(min(max_elems, max(source.numel(), 1)), dtype=dtype)
        return buffer[: source.numel()].view(source.shape).copy_(source)

    def named(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A contiguous ``shape`` tensor backed by the buffer ``key`` (grown, never shrunk); its
        contents are overwritten by the next request for ``key``."""
        numel = int(np.prod(shape))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(max(numel, 1), dtype=dtype)
        return buffer[:numel].view(shape)


def row_dots(rows: Tensor, transform=None, scratch: Scratch | None = None) -> Tensor:
    """``r . transform(r)`` (``r . r`` without one) of every row, in float64, a block of rows
    at a time: no full-chunk float64 copy."""
    scratch = scratch or Scratch()
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    elems = BLOCK_ELEMS if transform is None else PRE_BLOCK_ELEMS
    step = block_rows(rows.shape[1], elems)
    for lo in range(0, rows.shape[0], step):
        block = scratch.block(rows[lo : lo + step], torch.float64, step * rows.shape[1])
        other = block if transform is None else transform(block)
        # a batched 1 x d @ d x 1 product: no block-sized temporary (vecdot allocates one per block,
        # and multi-MB blocks freed per chunk fragment the heap)
        torch.bmm(block.unsqueeze(1), other.unsqueeze(2), out=out[lo : lo + step].view(-1, 1, 1))
    return out


def self_influence_rows(pre: Preconditioner, rows: Tensor, scratch: Scratch | None = None) -> Tensor:
    """``g^T H^-1 g`` of every row, float64."""
    return row_dots(rows, None if pre.kind is PreconditionerType.IDENTITY else pre, scratch)


def unit_rows(rows: Tensor) -> Tensor:
    rows = rows.to(torch.float64)
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)


def score_block(pq: Tensor, rows: Tensor, scratch: Scratch | None = None, key: str = "scores",
                as_float64: bool = True) -> Tensor:
    """``pq @ rows.T`` in ``pq``'s dtype, as float64 (in the scratch buffer ``key``: valid until
    the next call with that key); rows of another dtype are converted a block at a time.
    ``as_float64=False``: the GEMM's own output when the dtypes match (no float64 copy)."""
    scratch = scratch or Scratch()
    shape = (pq.shape[0], rows.shape[0])
    if rows.dtype == pq.dtype and not as_float64:
        return torch.matmul(pq, rows.T, out=scratch.named(key + ":gemm", shape, pq.dtype))
    out = scratch.named(key, shape, torch.float64)
    if rows.dtype == pq.dtype:
        if pq.dtype == torch.float64:
            return torch.matmul(pq, rows.T, out=out)
        return out.copy_(torch.matmul(pq, rows.T, out=scratch.named(key + ":gemm", shape, pq.dtype)))
    step = block_rows(rows.shape[1])
    for lo in range(0, rows.shape[0], step):
        out[:, lo : lo + step] = pq @ scratch.block(rows[lo : lo + step], pq.dtype, step * rows.shape[1]).T
    return out


CODED_BLOCK_BYTES = 32 * 2**20  # quantized rows are decoded this many float32 bytes at a time (L3-sized)


def _coded_parts(pq: Tensor, coded: CodedRows):
    """How ``score_coded`` reads the codes: per part (int8: the codes; int4: the low nibbles, the
    even columns, then the high ones, the odd columns) the query columns and a decoder, and per
    block its column range in each part and the code offset (int4 stores ``code + 8``)."""
    dim = coded.layout.dim
    if coded.bits == 8:
        parts = [(pq.T.contiguous(), dim, lambda c, buf, nibbles: buf.copy_(c))]
        spans = [((b.columns,), None) for b in coded.layout.blocks]
        return parts, spans
    even, odd = (dim + 1) // 2, dim // 2
    def low(c: Tensor, buf: Tensor, nibbles: Tensor) -> Tensor:
        return buf.copy_(torch.bitwise_and(c[:, :even], 0x0F, out=nibbles[:, :even]))

    def high(c: Tensor, buf: Tensor, nibbles: Tensor) -> Tensor:
        return buf.copy_(torch.bitwise_right_shift(c[:, :odd], 4, out=nibbles[:, :odd]))

    parts = [(pq[:, 0::2].T.contiguous(), even, low), (pq[:, 1::2].T.contiguous(), odd, high)]
    spans = []
    for b in coded.layout.blocks:
        lo, hi = b.columns.start, b.columns.stop
        spans.append(((slice((lo + 1) // 2, (hi + 1) // 2), slice(lo // 2, hi // 2)),
                      8.0 * pq[:, lo:hi].sum(1)[None, :]))
    return parts, spans


def score_coded(pq: Tensor, coded: CodedRows, scratch: Scratch, key: str = "scores",
                sq_norms: bool = False) -> tuple[Tensor, Tensor | None]:
    """``pq @ rows.T`` (float32 ``pq``; in the scratch buffer ``key + ":gemm"``) of quantized rows
    without their float32 copy, and with ``sq_norms`` every row's squared norm (float64).

    A few rows at a time (``CODED_BLOCK_BYTES``, cache-sized reused buffers) the stored codes become
    float32 in contiguous passes (int4: the low and the high nibbles into two halves, matched by the
    even and the odd query columns, so nothing is interleaved; the ``+ 8`` of the stored nibbles is
    taken off each block's product as ``8 * sum(pq_block)``), and each block's GEMM is scaled by the
    rows' block scales after it: ``score[q, r] = sum_b s[r, b] (pq[q, b] . c[r, b])``."""
    n, n_q = len(coded), pq.shape[0]
    out = scratch.named(key + ":gemm", (n_q, n), torch.float32)
    norms = torch.zeros(n, dtype=torch.float64) if sq_norms else None
    codes, scales = torch.from_numpy(np.asarray(coded.codes)), torch.from_numpy(np.asarray(coded.scales))
    parts, spans = _coded_parts(pq, coded)
    step = max(16, CODED_BLOCK_BYTES // (4 * coded.layout.dim))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        nibbles = scratch.named("coded:nibbles", (hi - lo, codes.shape[1]), torch.uint8)
        values = [decode(codes[lo:hi], scratch.named(f"coded:{i}", (hi - lo, width), torch.float32), nibbles)
                  for i, (_, width, decode) in enumerate(parts)]
        acc = scratch.named("coded:acc", (hi - lo, n_q), torch.float32)
        part = scratch.named("coded:part", (hi - lo, n_q), torch.float32)
        for b, (cols, offset) in enumerate(spans):
            target = acc if b == 0 else part
            for i, c in enumerate(cols):  # rows x query columns: the freshly decoded block is the GEMM's A
                if i == 0:
                    torch.mm(values[i][:, c], parts[i][0][c], out=target)
                else:
                    target.addmm_(values[i][:, c], parts[i][0][c])
            if offset is not None:
                target.sub_(offset)
            scale = scales[lo:hi, b]
            if b == 0:
                acc.mul_(scale[:, None])
            else:
                acc.addcmul_(part, scale[:, None])
            if norms is not None:  # integer values: their sums are exact in float32
                sq = sum(values[i][:, c].square().sum(1).to(torch.float64) for i, c in enumerate(cols))
                if offset is not None:  # sum (u - 8)^2 = sum u^2 - 16 sum u + 64 count
                    total = sum(values[i][:, c].sum(1).to(torch.float64) for i, c in enumerate(cols))
                    count = sum(c.stop - c.start for c in cols)
                    sq = sq - 16.0 * total + 64.0 * count
                norms[lo:hi] += sq * scale.to(torch.float64) ** 2
        out[:, lo:hi] = acc.T
    return out, norms


class TopK:
    """Running top-k (largest) values and global indices per query.

    Values are kept in the dtype of the scores they came from (float32 scores are exact in
    float32) and read as float64 through :attr:`values64`."""

    def __init__(self, n_query: int, k: int, largest: bool) -> None:
        self.k, self.largest = k, largest
        fill = -float("inf") if largest else float("inf")
        self.values = torch.full((n_query, 0), fill, dtype=torch.float64)
        self.index = torch.zeros((n_query, 0), dtype=torch.long)

    def update(self, scores: Tensor, start: int) -> None:
        """Merge a chunk of scores whose first column is global row ``start``: one top-k over the
        running best and the chunk together."""
        kept = self.values.shape[1]
        candidates = scores if kept == 0 else torch.cat([self.values.to(scores.dtype), scores], 1)
        k = min(self.k, candidates.shape[1])
        self.values, pos = candidates.topk(k, dim=1, largest=self.largest, sorted=True)
        if kept == 0:
            self.index = pos + start
        else:
            old = self.index.gather(1, pos.clamp(max=kept - 1))
            self.index = torch.where(pos < kept, old, pos - kept + start)

    @property
    def values64(self) -> Tensor:
        return self.values.to(torch.float64)


def normalise(scores: Tensor, mode: ScoreMode, q_norms: Tensor | None, s_inf: Tensor | None) -> Tensor:
    if mode is ScoreMode.RELATIVE:
        return scores.div_(s_inf.clamp_min(1e-30).sqrt()[None, :])
    if mode is ScoreMode.COSINE:
        return scores.div_((q_norms[:, None] * s_inf.clamp_min(1e-30).sqrt()[None, :]).clamp_min(1e-30))
    return scores


def best_k(values: Tensor, index: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """The ``k`` best of candidate ``values`` per query (sorted) and their global ``index``
    (the merge of several parts' top-k: the top-k of their union)."""
    k = min(k, values.shape[1])
    values, pos = values.topk(k, dim=1, largest=largest, sorted=True)
    return values, index.gather(1, pos)

"""What a store's chunk iterator hands out: consecutive rows with their ids, or their codes.

A chunk of a quantized store read with ``iter_chunks(coded=True)`` carries the rows' codes and
per-block scales as stored (:class:`CodedRows`, memory-mapped where the file allows) and decodes
them to float32 only when ``rows`` is first read, so a consumer that works on the codes (the
scorer's fused int4 / int8 GEMM, :func:`logix.analysis.kernels.score_coded`) never makes the
full-precision copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from logix.config.choices import StoreDtype
from logix.store.format import Layout
from logix.store.quant import QUANT_BITS, dequantize

Id = int | str


def to_torch(rows: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A tensor sharing ``rows``' memory (bfloat16 rows are stored as uint16)."""
    tensor = torch.from_numpy(rows)  # shares memory and keeps ``rows`` alive
    return tensor.view(torch.bfloat16) if dtype_name == StoreDtype.BFLOAT16 else tensor


@dataclass
class CodedRows:
    """Quantized rows as stored: ``codes`` (int8, or int4 packed two per byte) and ``scales``
    (rows x blocks, float32) in ``layout``; ``x = code * scale`` block by block."""

    codes: np.ndarray
    scales: np.ndarray
    layout: Layout
    dtype_name: str

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.dtype_name]

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def decode(self) -> torch.Tensor:
        """The float32 rows (``n x dim``)."""
        return torch.from_numpy(dequantize(self.codes, self.scales, self.layout, self.dtype_name))


@dataclass
class Chunk:
    """Consecutive committed rows: ``rows[i]`` belongs to ``ids[i]`` (and ``positions[i]``).

    ``coded``: the rows' codes (a quantized store read with ``coded=True``); ``rows`` then decodes
    them on first access.

    Attributes:
        ids: The rows' ids.
        positions: The rows' token positions in a per-token store, else None.
        start: The index of the first row in the store's global order.
        coded: The rows' codes when a quantized store was read with ``coded=True``, else None.
    """

    ids: list[Id]
    _rows: torch.Tensor | None
    positions: np.ndarray | None
    start: int  # index of the first row in the store's global order
    coded: CodedRows | None = field(default=None, repr=False)

    @property
    def rows(self) -> torch.Tensor:
        """``(n, dim)`` rows in the store's ``dtype`` (float32 for a quantized store, decoded on first access)."""
        if self._rows is None:
            self._rows = self.coded.decode()
        return self._rows

    def __len__(self) -> int:
        return len(self.ids)

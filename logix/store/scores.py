"""The score-matrix file: the full ``n_query x n_train`` influence scores as HDF5.

One dataset, ``scores`` (float32, query rows by train columns), written by
:func:`~logix.analysis.compute_influence` (``scores_path``) block by block as the train store
streams past. The sharded scorer writes one such file per part (its columns) and then one
*virtual* dataset over them (:func:`write_virtual_score_matrix`), which reads as one matrix
through h5py as long as the part files stay beside it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from logix.store.format import fsync_file

SCORES_DATASET = "scores"


class ScoreMatrixWriter:
    """A score-matrix file being written: create it, :meth:`write` blocks of it, :meth:`close` it.

    The file is written under a hidden temporary name and renamed to ``path`` only by
    ``close()`` (``close(commit=False)`` discards it), so a killed scorer never leaves a partial
    matrix at ``path``, and an earlier matrix there stays whole until the new one replaces it.

    Args:
        path: The HDF5 file to write.
        n_query: Rows of the matrix.
        n_train: Columns of the matrix.
    """

    def __init__(self, path: str | Path, n_query: int, n_train: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._fh = h5py.File(self.tmp, "w")
        self._scores = self._fh.create_dataset(
            SCORES_DATASET, shape=(n_query, n_train), dtype=np.float32,
            chunks=(max(1, min(n_query, 64)), max(1, min(n_train, 4096))),
        )

    def write(self, queries: slice, start: int, scores: np.ndarray) -> None:
        """The scores of the queries ``queries`` against the train columns from ``start`` on."""
        self._scores[queries, start : start + scores.shape[1]] = scores.astype(np.float32)

    def close(self, commit: bool = True) -> None:
        if not self._fh:
            return
        self._fh.close()
        if commit:
            fsync_file(self.tmp)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_virtual_score_matrix(path: str | Path, parts: Sequence[tuple[str, int, int]], n_query: int) -> None:
    """One ``(n_query x n_train)`` virtual score matrix at ``path`` mapping the columns
    ``lo:hi`` of each part ``(file name beside path, lo, hi)``; replaced atomically.

    Args:
        path: The HDF5 file to write (the parts' files stay beside it).
        parts: ``(file name beside path, lo, hi)`` of each part, covering the train columns.
        n_query: Rows of the matrix.
    """
    path = Path(path)
    n_train = parts[-1][2] if parts else 0
    layout = h5py.VirtualLayout(shape=(n_query, n_train), dtype=np.float32)
    for name, lo, hi in parts:
        source = h5py.VirtualSource(name, SCORES_DATASET, shape=(n_query, hi - lo))
        layout[:, lo:hi] = source
    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as fh:
        fh.create_virtual_dataset(SCORES_DATASET, layout, fillvalue=np.nan)
        fh.attrs["parts"] = len(parts)
    os.replace(tmp, path)


def read_score_matrix(path: str | Path, max_values: int | None = None) -> np.ndarray | None:
    """The score matrix of the file ``path``.

    Args:
        path: A score-matrix file (``scores.h5``).
        max_values: With it, a larger matrix comes as every ``ceil(size / max_values)``-th column
            only (a sample).

    Returns:
        ``(n_query, n_train)`` scores (or the sampled columns); None when the file holds none.
    """
    with h5py.File(path, "r") as fh:
        if SCORES_DATASET not in fh:
            return None
        ds = fh[SCORES_DATASET]
        if max_values is not None and ds.size > max_values:
            step = int(math.ceil(ds.size / max_values))
            return np.asarray(ds[:, ::step])
        return np.asarray(ds[...])

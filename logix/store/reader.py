"""Read committed rows: streaming in bounded-memory chunks, or by id.

Only shards named in the manifest are visible, so a reader never sees a partial
shard, even while a writer is still running or after a crash.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from logix.errors import StoreError
from logix.store.format import TORCH_DTYPES, Layout, from_numpy, read_manifest

Id = int | str


@dataclass
class Chunk:
    """Consecutive committed rows: ``rows[i]`` belongs to ``ids[i]`` (and ``positions[i]``)."""

    ids: list[Id]
    rows: torch.Tensor
    positions: np.ndarray | None
    start: int  # index of the first row in the store's global order


class Store:
    """A read-only view of one store's committed shards."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise StoreError(f"No logix store at {self.directory} (no manifest.json).")
        self.manifest = manifest
        self.layout = Layout.from_json(manifest["layout"])
        self.dtype_name: str = manifest["dtype"]
        self.per_token: bool = manifest["per_token"]
        self._shards = [(s["file"], int(s["rows"])) for s in manifest["shards"]]
        self._ids: list[Id] | None = None
        self._positions: np.ndarray | None = None
        self._index: dict[object, int] | None = None

    # ---- metadata ---------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return sum(n for _, n in self._shards)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype_name]

    @property
    def modules(self) -> list[str]:
        return self.layout.names

    @property
    def ids(self) -> list[Id]:
        """Ids of every committed row, in store order."""
        if self._ids is None:
            self._load_ids()
        return list(self._ids)

    @property
    def positions(self) -> np.ndarray | None:
        """Token positions of a per-token store (None for per-example stores)."""
        if self._ids is None:
            self._load_ids()
        return self._positions

    def nbytes(self) -> int:
        return self.n_rows * self.dim * torch.empty(0, dtype=self.dtype).element_size()

    def _convert_ids(self, raw: np.ndarray) -> list[Id]:
        texts = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
        if self.manifest.get("id_type") == "int":
            return [int(x) for x in texts]
        return texts

    def _load_ids(self) -> None:
        ids: list[Id] = []
        positions = []
        for name, _ in self._shards:
            with h5py.File(self.directory / name, "r") as fh:
                ids.extend(self._convert_ids(fh["ids"][()]))
                if self.per_token:
                    positions.append(fh["positions"][()])
        self._ids = ids
        self._positions = np.concatenate(positions) if positions else (
            np.zeros(0, np.int64) if self.per_token else None
        )

    def _key(self, i: int) -> object:
        if self.per_token:
            return (self._ids[i], int(self._positions[i]))
        return self._ids[i]

    def index_of(self, key: object) -> int:
        """Global row index of an id (or ``(id, position)`` for per-token stores)."""
        if self._index is None:
            if self._ids is None:
                self._load_ids()
            self._index = {self._key(i): i for i in range(len(self._ids))}
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"Id {key!r} is not in the store {self.directory}.") from None

    # ---- rows -------------------------------------------------------------------------
    def _columns(self, modules: Sequence[str] | None) -> list[slice] | None:
        if modules is None:
            return None
        return [self.layout.block(m).columns for m in modules]

    def _read(self, fh: h5py.File, lo: int, hi: int, columns: list[slice] | None) -> torch.Tensor:
        if columns is None:
            return from_numpy(fh["rows"][lo:hi], self.dtype_name)
        parts = [from_numpy(fh["rows"][lo:hi, c], self.dtype_name) for c in columns]
        return torch.cat(parts, dim=1)

    def _chunks(self, chunk_rows: int, modules: Sequence[str] | None) -> Iterator[Chunk]:
        """Chunks of exactly ``chunk_rows`` rows (the last may be shorter), spanning shards, so
        that two stores with the same number of rows chunk identically."""
        columns = self._columns(modules)
        parts: list[Chunk] = []
        held, start = 0, 0
        for name, n in self._shards:
            with h5py.File(self.directory / name, "r") as fh:
                ids = self._convert_ids(fh["ids"][()])
                pos = fh["positions"][()] if self.per_token else None
                lo = 0
                while lo < n:
                    hi = min(n, lo + chunk_rows - held)
                    rows = self._read(fh, lo, hi, columns)
                    parts.append(Chunk(ids[lo:hi], rows, None if pos is None else pos[lo:hi], start))
                    held += hi - lo
                    start += hi - lo
                    lo = hi
                    if held == chunk_rows:
                        yield _join(parts)
                        parts, held = [], 0
        if parts:
            yield _join(parts)

    def iter_chunks(
        self,
        chunk_rows: int = 4096,
        modules: Sequence[str] | None = None,
        prefetch: int = 2,
    ) -> Iterator[Chunk]:
        """Yield committed rows in chunks of at most ``chunk_rows`` rows.

        Memory is bounded by ``(prefetch + 1) * chunk_rows * dim`` elements whatever
        the store size; ``prefetch > 0`` reads ahead in a background thread.
        ``modules`` restricts the columns to those modules' blocks (in that order).
        """
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}.")
        if prefetch <= 0:
            yield from self._chunks(chunk_rows, modules)
            return
        yield from _prefetched(self._chunks(chunk_rows, modules), prefetch)

    def read_all(self, modules: Sequence[str] | None = None) -> torch.Tensor:
        """All committed rows as one tensor (small stores only)."""
        parts = [c.rows for c in self.iter_chunks(1 << 16, modules, prefetch=0)]
        width = self.dim if modules is None else sum(self.layout.block(m).size for m in modules)
        return torch.cat(parts) if parts else torch.empty(0, width, dtype=self.dtype)

    def get(self, ids: Sequence[object], modules: Sequence[str] | None = None) -> torch.Tensor:
        """Rows of the given ids (or ``(id, position)`` keys), in the order asked."""
        wanted = [self.index_of(k) for k in ids]
        columns = self._columns(modules)
        out: list[torch.Tensor | None] = [None] * len(wanted)
        bounds = np.cumsum([0] + [n for _, n in self._shards])
        for s, (name, _) in enumerate(self._shards):
            here = [(j, g - bounds[s]) for j, g in enumerate(wanted) if bounds[s] <= g < bounds[s + 1]]
            if not here:
                continue
            with h5py.File(self.directory / name, "r") as fh:
                for j, local in here:
                    out[j] = self._read(fh, int(local), int(local) + 1, columns)
        width = self.dim if modules is None else sum(self.layout.block(m).size for m in modules)
        return torch.cat(out) if out else torch.empty(0, width, dtype=self.dtype)

    def module_rows(self, rows: torch.Tensor, module: str) -> torch.Tensor:
        """View the block of ``module`` in full rows as ``(n, k_out, k_in)``."""
        block = self.layout.block(module)
        return rows[:, block.columns].reshape(rows.shape[0], *block.shape)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return (
            f"Store({str(self.directory)!r}, rows={self.n_rows}, dim={self.dim}, "
            f"dtype={self.dtype_name}, modules={len(self.layout.blocks)}, shards={self.n_shards})"
        )


def _join(parts: list[Chunk]) -> Chunk:
    if len(parts) == 1:
        return parts[0]
    positions = None if parts[0].positions is None else np.concatenate([p.positions for p in parts])
    rows = torch.cat([p.rows for p in parts])
    return Chunk([i for p in parts for i in p.ids], rows, positions, parts[0].start)


def _prefetched(source: Iterator[Chunk], depth: int) -> Iterator[Chunk]:
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(done)
        except BaseException as exc:  # re-raised in the consumer
            buffer.put(exc)

    thread = threading.Thread(target=produce, name="logix-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)


def load_store(directory: str | Path) -> Store:
    """Open a store directory (``<run_dir>/stores/<name>``) for reading."""
    return Store(directory)

"""Read committed rows: streaming in bounded-memory chunks, or by id.

Only shards named in the manifest are visible, so a reader never sees a partial shard, even while
a writer runs or after a crash. Every byte handed out is verified first (:mod:`logix.store.integrity`):
on open each shard's size; before a shard's ids are used, the hash of its non-row bytes and its
shapes; before its rows are first read, the hash of the rows. Ids held by several rows are refused.
A failed check raises :class:`~logix.errors.StoreError` naming the file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

import logix.store.quant as quant
from logix.core.checksum import damaged
from logix.core.dtypes import DISK_DTYPES, HOST_DTYPES, row_dtype
from logix.errors import StoreError
from logix.store.chunks import Chunk, CodedRows, Id, to_torch
from logix.store.format import MANIFEST, IdType, Layout, from_numpy, read_manifest
from logix.store.integrity import (
    Problem,
    duplicate_error,
    duplicate_problem,
    open_problems,
    raise_first,
    shard_problem,
    store_problems,
)
from logix.store.mapping import (
    Piece,
    Ring,
    Source,
    can_map,
    fill_rows,
    mapped,
    plan_chunks,
    prefetched,
    raw_offset,
)


class Store:
    """A read-only view of one store's committed shards; every byte read is checked against its checksum.

    Args:
        directory: The store directory (``<run_dir>/stores/<name>``).
        check_duplicates: False lists ids held by several rows instead of refusing them (to repair a store).
    """

    def __init__(self, directory: str | Path, check_duplicates: bool = True) -> None:
        self.directory = Path(directory)
        self.check_duplicates = check_duplicates
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise StoreError(f"No logix store at {self.directory} (no {MANIFEST}).")
        self.manifest = manifest
        self.layout = Layout.from_json(manifest["layout"])
        self.dtype_name: str = manifest["dtype"]
        self.quantized = quant.is_quantized(self.dtype_name)
        self.per_token: bool = manifest["per_token"]
        self._entries = manifest["shards"]
        raise_first(open_problems(self.directory, manifest))
        self._shards = [(s["file"], int(s["rows"])) for s in self._entries]
        self._checked: set[tuple[int, bool]] = set()
        self._ids: list[Id] | None = None
        self._positions: np.ndarray | None = None
        self._index: dict[object, int] | None = None
        self._row_sources: list[Source] | None = None
        self._quant_sources: dict[int, tuple[Source, Source]] = {}

    # ---- metadata ---------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return sum(n for _, n in self._shards)

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def shard_rows(self) -> list[int]:
        """Rows of each committed shard, in store order."""
        return [n for _, n in self._shards]

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the rows handed out (float32 for quantized stores)."""
        return row_dtype(self.dtype_name)

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
        """Bytes of the stored rows (codes and scales for quantized stores)."""
        if self.quantized:
            return self.n_rows * quant.row_bytes(self.dtype_name, self.layout)
        return self.n_rows * self.dim * torch.empty(0, dtype=self.dtype).element_size()

    def verify(self) -> list[Problem]:
        """Every byte of the store checked (shards, state file, duplicate ids): one problem per damaged file."""
        return store_problems(self.directory)

    def _check(self, s: int, rows: bool = False) -> None:
        """Verify shard ``s``'s rows (``rows``) or its other bytes, once, before they are used."""
        if (s, rows) in self._checked:
            return
        problem = shard_problem(self.directory, self._entries[s], self.manifest, rows)
        if problem is not None:
            raise damaged(self.directory / self._shards[s][0], problem)
        self._checked.add((s, rows))

    def _convert_ids(self, raw: np.ndarray) -> list[Id]:
        texts = [x.decode() if isinstance(x, bytes) else str(x) for x in raw]
        if self.manifest.get("id_type") == IdType.INT:
            return [int(x) for x in texts]
        return texts

    def _load_ids(self) -> None:
        ids: list[Id] = []
        positions = []
        owners: list[str] = []
        for s, (name, n) in enumerate(self._shards):
            self._check(s)
            with h5py.File(self.directory / name, "r") as fh:
                ids.extend(self._convert_ids(fh["ids"][()]))
                if self.per_token:
                    positions.append(fh["positions"][()])
            owners += [name] * n
        all_positions = np.concatenate(positions) if positions else (
            np.zeros(0, np.int64) if self.per_token else None
        )
        keys = ids if not self.per_token else list(zip(ids, all_positions.tolist()))
        problem = None
        if self.check_duplicates and len(set(keys)) != len(keys):
            problem = duplicate_problem(keys, owners)
        if problem is not None:
            raise duplicate_error(self.directory, problem)
        self._ids = ids
        self._positions = all_positions

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

    def _width(self, columns: list[slice] | None) -> int:
        return self.dim if columns is None else sum(c.stop - c.start for c in columns)

    def _read(self, fh: h5py.File, lo: int, hi: int, columns: list[slice] | None) -> torch.Tensor:
        if self.quantized:
            rows = quant.dequantize(fh["rows"][lo:hi], fh["scales"][lo:hi], self.layout, self.dtype_name, columns)
            return torch.from_numpy(rows)
        if columns is None:
            return from_numpy(fh["rows"][lo:hi], self.dtype_name)
        parts = [from_numpy(fh["rows"][lo:hi, c], self.dtype_name) for c in columns]
        return torch.cat(parts, dim=1)

    def _sources(self) -> list[Source]:
        """Where each shard's rows live (cached: committed shards never change)."""
        if self._row_sources is None:
            disk = np.dtype(DISK_DTYPES[self.dtype_name])
            sources = []
            for s, (name, n) in enumerate(self._shards):
                self._check(s)
                path = self.directory / name
                with h5py.File(path, "r") as fh:
                    sources.append(Source(path, disk, raw_offset(fh["rows"], disk, (n, self.dim))))
            self._row_sources = sources
        return self._row_sources

    def _chunks(
        self, chunk_rows: int, modules: Sequence[str] | None, align_to_shards: bool = False,
        ring: Ring | None = None, populate: bool = False, start: int = 0, stop: int | None = None,
        coded: bool = False,
    ) -> Iterator[Chunk]:
        """Chunks of exactly ``chunk_rows`` rows (the last may be shorter), spanning shards, so
        that two stores with the same number of rows chunk identically; with ``align_to_shards``,
        chunks follow the shards instead (see :meth:`iter_chunks`)."""
        columns = self._columns(modules)
        width = self._width(columns)
        sources = None if self.quantized else self._sources()
        ring = ring or Ring(1, HOST_DTYPES[self.dtype_name])
        labels = _Labels(self)
        for pieces in plan_chunks(self.shard_rows, chunk_rows, align_to_shards, start, stop):
            n = sum(hi - lo for _, lo, hi in pieces)
            for s, _, _ in pieces:
                self._check(s, rows=True)
            s, lo, hi = pieces[0]
            ids, positions = labels.get(start, n, pieces)
            rows = codes = None
            if coded and self.quantized and columns is None:  # codes as stored: decoded on first use
                codes = self._coded(pieces)
            elif (len(pieces) == 1 and columns is None and not self.quantized and sources[s].offset is not None
                    and can_map()):
                rows = mapped(sources[s], lo, hi, self.dim, populate).view(HOST_DTYPES[self.dtype_name])
            else:
                rows = ring.take(n, width)
                at = 0
                for s, lo, hi in pieces:
                    self._fill(rows[at : at + hi - lo], s, lo, hi, columns)
                    at += hi - lo
            yield Chunk(ids, None if rows is None else to_torch(rows, self.dtype_name), positions, start, codes)
            rows = None  # the ring may reuse the buffer once the consumer drops the chunk
            start += n

    def _quant_source(self, s: int):
        if s not in self._quant_sources:
            self._quant_sources[s] = quant.quantized_sources(self.directory / self._shards[s][0])
        return self._quant_sources[s]

    def _coded(self, pieces: list[Piece]) -> CodedRows:
        """The codes and scales of ``pieces`` (memory maps of one shard, or joined copies)."""
        parts = []
        for s, lo, hi in pieces:
            self._check(s)  # (rows checked by the caller)
            parts.append(quant.read_codes(self._quant_source(s), lo, hi, self.layout, self.dtype_name))
        codes, scales = parts[0] if len(parts) == 1 else (np.concatenate([p[i] for p in parts]) for i in (0, 1))
        return CodedRows(codes, scales, self.layout, self.dtype_name)

    def _fill(self, dest: np.ndarray, s: int, lo: int, hi: int, columns: list[slice] | None) -> None:
        """Copy rows ``lo:hi`` of shard ``s`` (their ``columns``) into ``dest``."""
        self._check(s)
        self._check(s, rows=True)
        if self.quantized:  # codes and scales memory-mapped (see quant.read_quantized)
            quant.read_quantized(self._quant_source(s), lo, hi, self.layout, self.dtype_name, columns, dest)
            return
        fill_rows(dest, self._sources()[s], lo, hi, self.dim, columns)

    def iter_chunks(
        self,
        chunk_rows: int = 4096,
        modules: Sequence[str] | None = None,
        prefetch: int = 2,
        align_to_shards: bool = False,
        start: int = 0,
        stop: int | None = None,
        coded: bool = False,
    ) -> Iterator[Chunk]:
        """Yield committed rows in chunks of at most ``chunk_rows`` rows.

        ``coded=True``: a quantized store's chunks (all modules) carry its codes, decoded on first read.

        ``start`` / ``stop`` restrict the rows to the global range ``start:stop`` (a part of the
        store, as a rank of a sharded scorer reads); ``Chunk.start`` stays a global index.

        Memory is bounded by about ``(prefetch + 3) * chunk_rows * dim`` elements whatever
        the store size; ``prefetch > 0`` reads ahead in a background thread.
        ``modules`` restricts the columns to those modules' blocks (in that order).

        By default every chunk but the last has exactly ``chunk_rows`` rows, spanning shards
        (two stores of as many rows chunk identically). With ``align_to_shards=True`` a shard of
        at least ``min(256, chunk_rows // 2)`` rows is never mixed with another: its chunks are
        zero-copy, copy-on-write memory maps of the shard file (for all modules); a chunk inside
        one shard is such a view in either mode unless 128 maps are alive (then it is a copy).
        Other rows are read into a few buffers, each reused only once nothing references the rows
        handed out from it, so keeping chunks is always safe. Writing into a chunk's rows never
        changes the store.
        """
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}.")
        if not 0 <= start <= (self.n_rows if stop is None else stop) <= self.n_rows:
            raise ValueError(f"Row range {start}:{stop} is outside the store's {self.n_rows} rows.")
        ring = Ring(max(prefetch, 0) + 3, HOST_DTYPES[self.dtype_name])
        if prefetch <= 0:
            yield from self._chunks(chunk_rows, modules, align_to_shards, ring, start=start, stop=stop, coded=coded)
            return
        yield from prefetched(self._chunks(chunk_rows, modules, align_to_shards, ring, populate=True,
                                            start=start, stop=stop, coded=coded), prefetch)

    def read_all(self, modules: Sequence[str] | None = None) -> torch.Tensor:
        """All committed rows as one tensor (small stores only)."""
        columns = self._columns(modules)
        out = np.empty((self.n_rows, self._width(columns)), HOST_DTYPES[self.dtype_name])
        at = 0
        for s, (_, n) in enumerate(self._shards):
            if n:
                self._fill(out[at : at + n], s, 0, n, columns)
            at += n
        return to_torch(out, self.dtype_name)

    def take(self, index: np.ndarray) -> torch.Tensor:
        """Rows at the global positions ``index`` (any order, repeats allowed), verified as always."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.dim), HOST_DTYPES[self.dtype_name])
        starts = np.cumsum([0, *self.shard_rows])
        shard = np.searchsorted(starts, index, side="right") - 1
        for s in np.unique(shard).tolist():
            pick, n = np.nonzero(shard == s)[0], self._shards[s][1]
            source = None if self.quantized else self._sources()[s]
            if source is not None and source.offset is not None and can_map():
                self._check(s, rows=True)
                whole = mapped(source, 0, n, self.dim, False).view(out.dtype)
            else:
                whole = np.empty((n, self.dim), out.dtype)
                self._fill(whole, s, 0, n, None)
            out[pick] = whole[index[pick] - starts[s]]
        return to_torch(out, self.dtype_name)

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
            self._check(s, rows=True)
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


class _Labels:
    """Ids and positions of consecutive chunks (from the store's cache when loaded)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._shard, self._ids, self._positions = -1, [], None

    def get(self, start: int, n: int, pieces: list[Piece]) -> tuple[list[Id], np.ndarray | None]:
        store = self.store
        if store._ids is not None:
            positions = None if store._positions is None else store._positions[start : start + n].copy()
            return store._ids[start : start + n], positions
        ids, positions = [], []
        for s, lo, hi in pieces:
            if s != self._shard:
                store._check(s)
                with h5py.File(store.directory / store._shards[s][0], "r") as fh:
                    self._ids = store._convert_ids(fh["ids"][()])
                    self._positions = fh["positions"][()] if store.per_token else None
                self._shard = s
            ids.extend(self._ids[lo:hi])
            if self._positions is not None:
                positions.append(self._positions[lo:hi])
        if not store.per_token:
            return ids, None
        return ids, positions[0].copy() if len(positions) == 1 else np.concatenate(positions)


def load_store(directory: str | Path) -> Store:
    """Open a store directory (``<run_dir>/stores/<name>``) for reading: ``Store(directory)``."""
    return Store(directory)

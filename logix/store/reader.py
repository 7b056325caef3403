"""Read committed rows: streaming in bounded-memory chunks, or by id.

Only shards named in the manifest are visible, so a reader never sees a partial
shard, even while a writer is still running or after a crash.
"""

from __future__ import annotations

import mmap
import queue
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from logix.errors import StoreError
from logix.store import quant
from logix.store.format import Layout, from_numpy, read_manifest, row_dtype

Id = int | str

_DISK_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}  # how rows lie in a shard
# rows as handed out (bfloat16 as its bits; quantized stores dequantize to float32)
_HOST_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "int8": np.float32,
                "int4": np.float32}
_ZERO_COPY_MIN_ROWS = 256  # shards at least this large (or half a chunk) are mapped, not gathered
_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a mapping's pages in, read-only, ahead of use
_MAX_LIVE_MAPS = 128  # each live memory map holds a file descriptor; past this, chunks are copies
_live_maps = [0]
_live_lock = threading.Lock()


@dataclass
class Chunk:
    """Consecutive committed rows: ``rows[i]`` belongs to ``ids[i]`` (and ``positions[i]``)."""

    ids: list[Id]
    rows: torch.Tensor
    positions: np.ndarray | None
    start: int  # index of the first row in the store's global order


class Store:
    """A read-only view of one store's committed shards.

    ``dtype_name`` is the stored dtype (``float32``, ``float16``, ``bfloat16``, or the quantized
    ``int8`` / ``int4``, where ``quantized`` is True); ``dtype`` is the dtype of the rows handed
    out, float32 for quantized stores, whose rows are dequantized as they are read
    (:mod:`logix.store.quant`). ``nbytes()`` counts the bytes actually stored."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        if manifest is None:
            raise StoreError(f"No logix store at {self.directory} (no manifest.json).")
        self.manifest = manifest
        self.layout = Layout.from_json(manifest["layout"])
        self.dtype_name: str = manifest["dtype"]
        self.quantized = quant.is_quantized(self.dtype_name)
        self.per_token: bool = manifest["per_token"]
        self._shards = [(s["file"], int(s["rows"])) for s in manifest["shards"]]
        self._ids: list[Id] | None = None
        self._positions: np.ndarray | None = None
        self._index: dict[object, int] | None = None
        self._row_sources: list[_Source] | None = None

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

    def _sources(self) -> list[_Source]:
        """Where each shard's rows live (cached: committed shards never change)."""
        if self._row_sources is None:
            disk = np.dtype(_DISK_DTYPES[self.dtype_name])
            sources = []
            for name, n in self._shards:
                path = self.directory / name
                with h5py.File(path, "r") as fh:
                    sources.append(_Source(path, disk, _raw_offset(fh["rows"], disk, (n, self.dim))))
            self._row_sources = sources
        return self._row_sources

    def _plan(self, chunk_rows: int, align_to_shards: bool, start: int = 0,
              stop: int | None = None) -> Iterator[list[tuple[int, int, int]]]:
        """Chunks as lists of ``(shard, lo, hi)`` pieces, in store order, covering the global
        rows ``start:stop`` only."""
        pieces: list[tuple[int, int, int]] = []
        held = 0
        big = min(_ZERO_COPY_MIN_ROWS, max(1, chunk_rows // 2))
        stop = self.n_rows if stop is None else stop
        first = 0  # global index of the shard's first row
        for s, (_, total) in enumerate(self._shards):
            first, shard_first = first + total, first
            skip = max(0, start - shard_first)
            n = min(total, stop - shard_first)
            if n <= skip:
                continue
            if align_to_shards and n - skip >= big:
                if pieces:  # small shards gathered so far
                    yield pieces
                    pieces, held = [], 0
                count = -(-(n - skip) // chunk_rows)  # equal pieces, none larger than chunk_rows
                bounds = [skip + (n - skip) * i // count for i in range(count + 1)]
                for lo, hi in zip(bounds[:-1], bounds[1:]):
                    yield [(s, lo, hi)]
                continue
            lo = skip
            while lo < n:
                hi = min(n, lo + chunk_rows - held)
                pieces.append((s, lo, hi))
                held += hi - lo
                lo = hi
                if held == chunk_rows:
                    yield pieces
                    pieces, held = [], 0
        if pieces:
            yield pieces

    def _chunks(
        self, chunk_rows: int, modules: Sequence[str] | None, align_to_shards: bool = False,
        ring: _Ring | None = None, populate: bool = False, start: int = 0, stop: int | None = None,
    ) -> Iterator[Chunk]:
        """Chunks of exactly ``chunk_rows`` rows (the last may be shorter), spanning shards, so
        that two stores with the same number of rows chunk identically; with ``align_to_shards``,
        chunks follow the shards instead (see :meth:`iter_chunks`)."""
        columns = self._columns(modules)
        width = self._width(columns)
        sources = None if self.quantized else self._sources()
        ring = ring or _Ring(1, _HOST_DTYPES[self.dtype_name])
        labels = _Labels(self)
        for pieces in self._plan(chunk_rows, align_to_shards, start, stop):
            n = sum(hi - lo for _, lo, hi in pieces)
            s, lo, hi = pieces[0]
            if (len(pieces) == 1 and columns is None and not self.quantized and sources[s].offset is not None
                    and _live_maps[0] < _MAX_LIVE_MAPS):
                rows = _mapped(sources[s], lo, hi, self.dim, populate).view(_HOST_DTYPES[self.dtype_name])
            else:
                rows = ring.take(n, width)
                at = 0
                for s, lo, hi in pieces:
                    self._fill(rows[at : at + hi - lo], s, lo, hi, columns)
                    at += hi - lo
            ids, positions = labels.get(start, n, pieces)
            yield Chunk(ids, _to_torch(rows, self.dtype_name), positions, start)
            rows = None  # the ring may reuse the buffer once the consumer drops the chunk
            start += n

    def _fill(self, dest: np.ndarray, s: int, lo: int, hi: int, columns: list[slice] | None) -> None:
        """Copy rows ``lo:hi`` of shard ``s`` (their ``columns``) into ``dest``."""
        if self.quantized:
            with h5py.File(self.directory / self._shards[s][0], "r") as fh:
                quant.dequantize(fh["rows"][lo:hi], fh["scales"][lo:hi], self.layout, self.dtype_name, columns,
                                 out=dest)
            return
        source = self._sources()[s]
        dest = dest.view(source.dtype)
        if source.offset is not None and columns is None:
            _pread_into(dest, source.path, source.offset + lo * dest.strides[0])
            return
        if source.offset is not None:
            mapped = _mapped(source, lo, hi, self.dim, False)
            at = 0
            for c in columns:
                np.copyto(dest[:, at : at + c.stop - c.start], mapped[:, c])
                at += c.stop - c.start
            return
        with h5py.File(source.path, "r") as fh:
            dset = fh["rows"]
            if columns is None:
                dset.read_direct(dest, np.s_[lo:hi])
                return
            at = 0
            for c in columns:
                dset.read_direct(dest, np.s_[lo:hi, c], np.s_[:, at : at + c.stop - c.start])
                at += c.stop - c.start

    def iter_chunks(
        self,
        chunk_rows: int = 4096,
        modules: Sequence[str] | None = None,
        prefetch: int = 2,
        align_to_shards: bool = False,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[Chunk]:
        """Yield committed rows in chunks of at most ``chunk_rows`` rows.

        ``start`` / ``stop`` restrict the rows to the global range ``start:stop`` (a part of the
        store, as a rank of a sharded scorer reads); ``Chunk.start`` stays a global index.

        Memory is bounded by about ``(prefetch + 3) * chunk_rows * dim`` elements whatever
        the store size; ``prefetch > 0`` reads ahead in a background thread.
        ``modules`` restricts the columns to those modules' blocks (in that order).

        By default every chunk but the last has exactly ``chunk_rows`` rows, spanning shards,
        so that two stores with the same number of rows chunk identically. With
        ``align_to_shards=True`` a shard of at least ``min(256, chunk_rows // 2)`` rows is
        never mixed with another: it comes as one or more equal chunks of at most
        ``chunk_rows`` rows that, for all modules, are zero-copy views of the shard file
        (copy-on-write memory maps); smaller shards are gathered as usual. A chunk that lies
        in one shard is such a view in either mode, unless 128 maps are already alive (each
        holds a file descriptor), as when a consumer keeps many chunks: then it is a copy.

        Rows that are not views are read into a few reused buffers. A buffer is reused only
        once nothing references the rows handed out from it (any tensor sharing their
        memory keeps them), so keeping chunks, or views of them, is always safe: it only
        costs fresh buffers. Writing into a chunk's rows never changes the store.
        """
        if chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}.")
        if not 0 <= start <= (self.n_rows if stop is None else stop) <= self.n_rows:
            raise ValueError(f"Row range {start}:{stop} is outside the store's {self.n_rows} rows.")
        ring = _Ring(max(prefetch, 0) + 3, _HOST_DTYPES[self.dtype_name])
        if prefetch <= 0:
            yield from self._chunks(chunk_rows, modules, align_to_shards, ring, start=start, stop=stop)
            return
        yield from _prefetched(self._chunks(chunk_rows, modules, align_to_shards, ring, populate=True,
                                            start=start, stop=stop), prefetch)

    def read_all(self, modules: Sequence[str] | None = None) -> torch.Tensor:
        """All committed rows as one tensor (small stores only)."""
        columns = self._columns(modules)
        out = np.empty((self.n_rows, self._width(columns)), _HOST_DTYPES[self.dtype_name])
        at = 0
        for s, (_, n) in enumerate(self._shards):
            if n:
                self._fill(out[at : at + n], s, 0, n, columns)
            at += n
        return _to_torch(out, self.dtype_name)

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



@dataclass(frozen=True)
class _Source:
    """One shard's rows: at byte ``offset`` of ``path`` as a plain C-ordered array, or, when
    ``offset`` is None (chunked or filtered datasets, other byte orders), through HDF5 only."""

    path: Path
    dtype: np.dtype  # on disk
    offset: int | None


def _raw_offset(dset: h5py.Dataset, dtype: np.dtype, shape: tuple[int, int]) -> int | None:
    if dset.shape != shape or dset.dtype != dtype or shape[0] == 0 or shape[1] == 0:
        return None
    plist = dset.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or plist.get_external_count():
        return None
    offset = dset.id.get_offset()
    return None if offset is None else int(offset)


def _mapped(source: _Source, lo: int, hi: int, dim: int, populate: bool) -> np.ndarray:
    """Rows ``lo:hi`` of a shard as a copy-on-write memory map of its file (no copy).

    The mapping lives as long as an array (or tensor) referencing it; committed shards are
    never modified in place, and writes to the map stay private to this process."""
    row_bytes = dim * source.dtype.itemsize
    begin = source.offset + lo * row_bytes
    length = (hi - lo) * row_bytes
    base = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(source.path, "rb") as fh:
        try:
            mapping = mmap.mmap(fh.fileno(), begin - base + length, access=mmap.ACCESS_COPY, offset=base)
        except ValueError as exc:  # the file is shorter than its header says
            raise StoreError(f"Shard {source.path} is truncated ({exc}); the store is damaged.") from exc
    with _live_lock:
        _live_maps[0] += 1
    weakref.finalize(mapping, _unmapped)
    if populate and sys.platform.startswith("linux"):
        try:  # fault the pages in here (the prefetch thread), not in the consumer's GEMM
            mapping.madvise(_MADV_POPULATE_READ)
        except (OSError, ValueError, AttributeError):
            pass
    return np.frombuffer(mapping, source.dtype, count=(hi - lo) * dim, offset=begin - base).reshape(hi - lo, dim)


def _unmapped() -> None:
    with _live_lock:
        _live_maps[0] -= 1


def _pread_into(dest: np.ndarray, path: Path, offset: int) -> None:
    """Fill the C-contiguous ``dest`` with the bytes of ``path`` at ``offset`` (one copy)."""
    view = memoryview(dest).cast("B")
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        done = 0
        while done < len(view):
            got = fh.readinto(view[done:])
            if not got:
                raise StoreError(f"Shard {path} is truncated; the store is damaged.")
            done += got


def _to_torch(rows: np.ndarray, dtype_name: str) -> torch.Tensor:
    tensor = torch.from_numpy(rows)  # shares memory and keeps ``rows`` alive
    return tensor.view(torch.bfloat16) if dtype_name == "bfloat16" else tensor


class _Ring:
    """Reused row buffers for chunks that are not zero-copy views.

    A buffer is handed out again only once the array handed out from it is dead, i.e. once
    no tensor shares its memory any more (``torch.from_numpy`` keeps the array alive). When
    every buffer is still referenced (a consumer keeping chunks), a fresh one is allocated,
    so a consumer never sees its rows change; at most ``capacity`` buffers are kept."""

    def __init__(self, capacity: int, dtype) -> None:
        self.capacity, self.dtype = capacity, np.dtype(dtype)
        self._slots: list[list] = []  # [buffer, weakref to the rows last handed out or None]
        self.allocated = 0  # buffers allocated so far (kept or not)

    def take(self, n: int, width: int) -> np.ndarray:
        size = n * width
        for slot in self._slots:
            if slot[1] is None or slot[1]() is None:
                if slot[0].size < size:
                    slot[0] = self._new(size)
                rows = slot[0][:size].reshape(n, width)
                slot[1] = weakref.ref(rows)
                return rows
        buffer = self._new(size)
        rows = buffer.reshape(n, width)
        if len(self._slots) < self.capacity:
            self._slots.append([buffer, weakref.ref(rows)])
        return rows

    def _new(self, size: int) -> np.ndarray:
        self.allocated += 1
        return np.empty(size, self.dtype)


class _Labels:
    """Ids and positions of consecutive chunks (from the store's cache when loaded)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._shard, self._ids, self._positions = -1, [], None

    def get(self, start: int, n: int, pieces: list[tuple[int, int, int]]) -> tuple[list[Id], np.ndarray | None]:
        store = self.store
        if store._ids is not None:
            positions = None if store._positions is None else store._positions[start : start + n].copy()
            return store._ids[start : start + n], positions
        ids, positions = [], []
        for s, lo, hi in pieces:
            if s != self._shard:
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
                item = None  # hold no chunk while reading the next one
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

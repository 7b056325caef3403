"""How the reader gets rows out of shard files fast: chunk plans, copy-on-write memory maps of
contiguous shards, direct reads, reused row buffers, and reading ahead in a thread.

Committed shards never change, so a shard whose rows lie as one plain C-ordered array in its
file can be handed out as a private memory map of that file (no copy), and read directly
(one ``readinto``) otherwise; shards HDF5 lays out otherwise (chunked, filtered) are read
through h5py by :class:`~logix.store.reader.Store`.
"""

from __future__ import annotations

import mmap
import queue
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np

from logix.errors import StoreError

T = TypeVar("T")

ZERO_COPY_MIN_ROWS = 256  # shards at least this large (or half a chunk) are mapped, not gathered
_MADV_POPULATE_READ = 22  # Linux >= 5.14: fault a mapping's pages in, read-only, ahead of use
MAX_LIVE_MAPS = 128  # each live memory map holds a file descriptor; past this, chunks are copies
_live_maps = [0]
_live_lock = threading.Lock()

Piece = tuple[int, int, int]  # (shard, lo, hi): rows lo:hi of one shard


def plan_chunks(shard_rows: list[int], chunk_rows: int, align_to_shards: bool, start: int = 0,
                stop: int | None = None) -> Iterator[list[Piece]]:
    """Chunks as lists of ``(shard, lo, hi)`` pieces, in store order, covering the global rows
    ``start:stop`` only, of a store whose shards hold ``shard_rows`` rows."""
    pieces: list[Piece] = []
    held = 0
    big = min(ZERO_COPY_MIN_ROWS, max(1, chunk_rows // 2))
    stop = sum(shard_rows) if stop is None else stop
    first = 0  # global index of the shard's first row
    for s, total in enumerate(shard_rows):
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


@dataclass(frozen=True)
class Source:
    """One shard's rows: at byte ``offset`` of ``path`` as a plain C-ordered array, or, when
    ``offset`` is None (chunked or filtered datasets, other byte orders), through HDF5 only."""

    path: Path
    dtype: np.dtype  # on disk
    offset: int | None


def raw_offset(dset: h5py.Dataset, dtype: np.dtype, shape: tuple[int, int]) -> int | None:
    """The byte offset of ``dset``'s rows in its file when they lie there as one plain
    ``shape`` array of ``dtype`` (else None)."""
    if dset.shape != shape or dset.dtype != dtype or shape[0] == 0 or shape[1] == 0:
        return None
    plist = dset.id.get_create_plist()
    if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters() or plist.get_external_count():
        return None
    offset = dset.id.get_offset()
    return None if offset is None else int(offset)


def live_map_count() -> int:
    """Memory maps handed out and still alive."""
    return _live_maps[0]


def can_map() -> bool:
    """Whether one more memory map may be handed out (fewer than ``MAX_LIVE_MAPS`` are alive)."""
    return _live_maps[0] < MAX_LIVE_MAPS


def mapped(source: Source, lo: int, hi: int, dim: int, populate: bool) -> np.ndarray:
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


def pread_into(dest: np.ndarray, path: Path, offset: int) -> None:
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


def fill_rows(dest: np.ndarray, source: Source, lo: int, hi: int, dim: int, columns: list[slice] | None) -> None:
    """Copy rows ``lo:hi`` of the (unquantized) shard ``source`` of ``dim`` columns (their
    ``columns``, all when None) into ``dest``."""
    dest = dest.view(source.dtype)
    if source.offset is not None and columns is None:
        pread_into(dest, source.path, source.offset + lo * dest.strides[0])
        return
    if source.offset is not None:
        rows = mapped(source, lo, hi, dim, False)
        at = 0
        for c in columns:
            np.copyto(dest[:, at : at + c.stop - c.start], rows[:, c])
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


class Ring:
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


def prefetched(source: Iterator[T], depth: int) -> Iterator[T]:
    """The items of ``source``, read up to ``depth`` ahead in a background thread (its errors
    are raised in the consumer; closing the consumer stops the thread)."""
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

"""Integrity of every stored byte: the checksums the writer records and the checks that use them.

At commit the writer records, in the manifest entry of each shard, the file's size and two
xxh3-128 hashes (:func:`shard_digest`) that together cover every byte of the file: of its rows'
bytes (the contiguous ``rows`` dataset, ``data: [offset, length]``) and of every other byte
(HDF5 headers, ids, scales, positions). A :class:`~logix.store.reader.Store` checks, before it hands out anything
of a shard, the size and the hash of the part it reads: the non-row bytes before the shard's
ids, scales or positions (:func:`meta_problem`), the rows' bytes before its rows
(:func:`data_problem`), so loading the ids of a large store costs a pass over its ids only and
each shard's rows are checked once, as they are first streamed (in the reader's prefetch
thread). :func:`store_problems` checks everything of one store, :func:`verify_run` everything
of a run or project directory (``logix verify``).

Why not HDF5's own checksums: ``fletcher32`` is a filter, and HDF5 applies filters only to
chunked datasets, so the rows would no longer lie as one plain array in the file and could not
be memory-mapped (``logix.store.mapping``); every read would go through HDF5's chunk cache and
a decode step. A hash of the file's bytes keeps the layout, and covers the headers, the ids
and the scales too, which fletcher32 on ``rows`` would not.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import xxhash

from logix.core.checksum import FIX, damaged
from logix.core.dtypes import DISK_DTYPES
from logix.errors import StoreError
from logix.store.format import manifest_ranks, read_manifest, read_rank_manifest
from logix.store.quant import code_width, is_quantized

HASHES = ("xxh3_meta", "xxh3_data")  # a shard's two parts: every byte but the rows, the rows


class Problem(NamedTuple):
    """One damaged file and what is wrong with it."""

    file: Path
    problem: str

    def __str__(self) -> str:
        return f"BAD {self.file}: {self.problem}"


def data_region(path: Path) -> list[int] | None:
    """``[offset, length]`` of the bytes of ``path``'s ``rows`` dataset when they lie in the file
    as one plain block (None when chunked, filtered or empty)."""
    with h5py.File(path, "r") as fh:
        dset = fh["rows"]
        plist = dset.id.get_create_plist()
        if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
            return None
        offset, length = dset.id.get_offset(), int(dset.id.get_storage_size())
    return None if offset is None or length == 0 else [int(offset), length]


def _hashes(path: Path, data: list[int] | None, which: tuple[str, ...] = HASHES) -> dict[str, str]:
    """The hashes ``which`` of ``path``: whole file, non-row bytes, row bytes (one read)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    lo, hi = (data[0], data[0] + data[1]) if data else (size, size)
    out = {}
    view = memoryview(mapping) if mapping is not None else memoryview(b"")
    try:
        if "xxh3" in which:
            out["xxh3"] = xxhash.xxh3_128(view).hexdigest()
        if "xxh3_meta" in which:
            with view[:lo] as head, view[hi:] as tail:
                h = xxhash.xxh3_128(head)
                h.update(tail)
            out["xxh3_meta"] = h.hexdigest()
        if "xxh3_data" in which:
            with view[lo:hi] as rows:
                out["xxh3_data"] = xxhash.xxh3_128(rows).hexdigest()
    finally:
        view.release()
        if mapping is not None:
            mapping.close()
    return out


def shard_digest(path: Path) -> dict[str, Any]:
    """What a shard's manifest entry records about its file: size, row bytes and hashes."""
    data = data_region(path)
    return {"bytes": os.path.getsize(path), "data": data, **_hashes(path, data)}


def file_digest(path: Path) -> dict[str, Any]:
    """Size and whole-file hash (``bytes``, ``xxh3``) of a file."""
    return {"bytes": os.path.getsize(path), **_hashes(path, None, ("xxh3",))}


def size_problem(path: Path, recorded: int) -> str | None:
    """Whether ``path`` is missing or has another size than recorded."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return "the file is missing (the manifest names it)"
    except OSError as exc:
        return f"cannot be read ({exc})"
    if size < recorded:
        return f"truncated: {size} bytes, the manifest records {recorded}"
    if size != recorded:
        return f"{size} bytes, the manifest records {recorded}"
    return None


def _hash_problem(path: Path, entry: dict[str, Any], which: tuple[str, ...]) -> str | None:
    problem = size_problem(path, entry["bytes"])
    if problem is not None:
        return problem
    try:
        actual = _hashes(path, entry.get("data"), which)
    except OSError as exc:
        return f"cannot be read ({exc})"
    part = {"xxh3": "the file", "xxh3_meta": "its headers, ids, scales or positions", "xxh3_data": "its rows"}
    for key in which:
        if actual[key] != entry[key]:
            return (f"{part[key]} do not match the checksum the manifest records (xxh3-128 {actual[key]}, "
                    f"recorded {entry[key]})").replace("the file do ", "the file does ")
    return None


def meta_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Size and the hash of every byte of a shard but its rows."""
    return _hash_problem(path, entry, ("xxh3_meta",))


def data_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """The hash of a shard's rows' bytes."""
    return _hash_problem(path, entry, ("xxh3_data",))


def file_problem(path: Path, entry: dict[str, Any]) -> str | None:
    """Size and both hashes of a shard (every byte of the file)."""
    return _hash_problem(path, entry, HASHES)


def dataset_problem(fh: h5py.File, entry: dict[str, Any], manifest: dict[str, Any]) -> str | None:
    """Whether a shard's datasets disagree with its manifest entry (row counts, widths, dtypes)."""
    n, dtype, dim = entry["rows"], manifest["dtype"], manifest["dim"]
    width = code_width(dtype, dim) if is_quantized(dtype) else dim
    itemsize = 1 if is_quantized(dtype) else np.dtype(DISK_DTYPES[dtype]).itemsize
    wanted = {"rows": (n, width), "ids": (n,)}
    if is_quantized(dtype):
        wanted["scales"] = (n, len(manifest["layout"]))
    if manifest["per_token"]:
        wanted["positions"] = (n,)
    for key, shape in wanted.items():
        if key not in fh:
            return f"the dataset {key!r} is missing"
        if fh[key].shape != shape:
            got = fh[key].shape
            if got[:1] != shape[:1]:
                return f"the manifest records {n} rows but the shard's {key!r} holds {got[0] if got else 0}"
            return f"{key!r} has shape {got}, the manifest's layout needs {shape}"
    if fh["rows"].dtype.itemsize != itemsize:
        return f"'rows' are {fh['rows'].dtype}, not the store's {dtype}"
    if fh.attrs.get("dtype", dtype) != dtype:
        return f"the shard is {fh.attrs['dtype']}, the manifest {dtype}"
    return None


def read_problem(exc: BaseException) -> str:
    """What an h5py error says, as a problem of a file."""
    return f"cannot be read as HDF5 ({type(exc).__name__}: {exc})"


def open_problems(directory: Path, manifest: dict[str, Any]) -> list[Problem]:
    """The checks of a store that cost no read: every shard named once, present, of its size."""
    problems, seen = [], set()
    for entry in manifest["shards"]:
        path = Path(directory) / entry["file"]
        if entry["file"] in seen:
            problems.append(Problem(path, "the manifest lists this shard twice"))
            continue
        seen.add(entry["file"])
        problem = size_problem(path, entry["bytes"])
        if problem is not None:
            problems.append(Problem(path, problem))
    return problems


def raise_first(problems: list[Problem]) -> None:
    """Raise the first of ``problems`` as a StoreError (noting how many more there are)."""
    if problems:
        more = f" ({len(problems) - 1} more problems: run `logix verify`)" if len(problems) > 1 else ""
        raise damaged(problems[0].file, problems[0].problem + more)


def duplicate_problem(keys: list, owners: list[str]) -> str | None:
    """Ids (keys) held by more than one row, with the shards that hold them."""
    first: dict[object, str] = {}
    dupes: list[str] = []
    for key, owner in zip(keys, owners):
        if key in first:
            dupes.append(f"{key!r} in {first[key]} and {owner}")
        else:
            first[key] = owner
    if not dupes:
        return None
    return f"{len(dupes)} ids are held by more than one row ({'; '.join(dupes[:5])})"


def duplicate_error(directory: Path, problem: str) -> StoreError:
    return StoreError(f"Store {directory}: {problem}; every id must be logged once. {FIX}")


def shard_problem(directory: Path, entry: dict[str, Any], manifest: dict[str, Any], rows: bool) -> str | None:
    """The check a reader makes before it uses a shard: its rows' bytes (``rows``), or every other
    byte and the shapes of its datasets against the manifest."""
    path = Path(directory) / entry["file"]
    if rows:
        return data_problem(path, entry)
    problem = meta_problem(path, entry)
    if problem is not None:
        return problem
    try:
        with h5py.File(path, "r") as fh:
            return dataset_problem(fh, entry, manifest)
    except (OSError, KeyError, ValueError) as exc:
        return read_problem(exc)


def _shard_ids(path: Path) -> list[str]:
    with h5py.File(path, "r") as fh:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in fh["ids"][()]]


def store_problems(directory: Path) -> list[Problem]:
    """Every problem of one store: its manifests, each shard's size, hashes and datasets, the
    state file, and ids held by more than one row (all shards and all ranks)."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except StoreError as exc:
        return [Problem(directory, str(exc))]
    if manifest is None:
        return [Problem(directory, "no manifest: not a logix store")]
    problems = open_problems(directory, manifest)
    bad = {p.file for p in problems}
    keys: list = []
    owners: list[str] = []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if path in bad:
            continue
        problem = file_problem(path, entry) or shard_problem(directory, entry, manifest, rows=False)
        if problem is not None:
            problems.append(Problem(path, problem))
            continue
        ids = _shard_ids(path)
        if manifest["per_token"]:
            with h5py.File(path, "r") as fh:
                ids = list(zip(ids, fh["positions"][()].tolist()))
        keys += ids
        owners += [entry["file"]] * len(ids)
    dupes = duplicate_problem(keys, owners)
    if dupes is not None:
        problems.append(Problem(directory, dupes))
    for rank_manifest in _rank_states(directory, manifest):
        path, recorded = rank_manifest
        problem = _hash_problem(path, recorded, ("xxh3",))
        if problem is not None:
            problems.append(Problem(path, problem))
    return problems


def _rank_states(directory: Path, manifest: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for rank in manifest_ranks(directory):
        m = read_rank_manifest(directory, rank)
        if m and m.get("state"):
            out.append((directory / m["state"], {"bytes": m["state_bytes"], "xxh3": m["state_xxh3"]}))
    return out

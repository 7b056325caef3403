"""Crash-safe, background shard writer.

A shard is written to a hidden temporary file, flushed and fsynced, atomically
renamed, and only then recorded in the manifest (itself replaced atomically). A
crash at any point leaves the manifest naming only whole shards; files it does
not name are removed when the store is reopened. Errors in the writer thread are
re-raised in the caller on the next ``submit``/``flush``/``close``.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from logix.core.checksum import save_tensors
from logix.errors import StoreError
from logix.store.format import (
    FORMAT_VERSION,
    IdType,
    Layout,
    fsync_dir,
    fsync_file,
    manifest_name,
    owns,
    read_rank_manifest,
    shard_name,
    state_name,
    to_numpy,
    write_manifest,
)
from logix.store.guard import acquire
from logix.store.integrity import file_digest, shard_digest
from logix.store.quant import is_quantized, quantize


@dataclass
class _Job:
    rows: torch.Tensor
    ids: list[str]
    positions: np.ndarray | None
    state: dict[str, torch.Tensor] | None


class ShardWriter:
    """Writes committed shards of one store in a background thread.

    ``rank``: the writer's rank under ``torch.distributed``; each rank has its own manifest and
    shard names in the same directory (see :mod:`logix.store.format`) and touches no other
    rank's files. Opening a store resumes it: uncommitted files of this writer are removed.

    Args:
        directory: The store directory.
        layout: The row layout.
        dtype: The stored dtype (``float32``, ``float16``, ``bfloat16``, ``int8``, ``int4``).
        per_token: One row per token instead of per example.
        queue_shards: Shards waiting for the background thread before a commit blocks.
        rank: The writer's rank.

    Raises:
        StoreError: The store was written with another layout, dtype or ``per_token``.
        RunDirectoryError: Another process writes this store (its lock is held).
    """

    def __init__(
        self,
        directory: Path,
        layout: Layout,
        dtype: str,
        per_token: bool,
        queue_shards: int = 2,
        rank: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        # one writer per (store, rank): a second process is refused before it touches a file
        self._lease = acquire(self.directory, f"-r{rank:05d}" if rank else "", what="store")
        self._manifest_file = self.directory / manifest_name(rank)
        self.dtype = dtype
        self.layout = layout
        self.manifest = self._open_manifest(layout, dtype, per_token)
        self._clean_orphans()
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_shards)
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="logix-shard-writer", daemon=True)
        self._thread.start()

    # ---- manifest -------------------------------------------------------------------
    def _open_manifest(self, layout: Layout, dtype: str, per_token: bool) -> dict[str, Any]:
        existing = read_rank_manifest(self.directory, self.rank)
        fresh = {
            "format": FORMAT_VERSION,
            "layout": layout.to_json(),
            "dim": layout.dim,
            "dtype": dtype,
            "per_token": per_token,
            "id_type": None,
            "shards": [],
            "state": None,
        }
        if existing is None:
            return write_manifest(self._manifest_file, fresh)
        for key in ("layout", "dtype", "per_token"):
            if existing[key] != fresh[key]:
                raise StoreError(
                    f"Store {self.directory} was written with a different {key} "
                    f"({existing[key]!r} vs {fresh[key]!r}); use a new run directory or overwrite=True."
                )
        return existing

    def _clean_orphans(self) -> None:
        """Remove this writer's temporary files and the shards its manifest does not commit
        (files of other ranks' writers are left alone: they may be writing right now)."""
        named = {s["file"] for s in self.manifest["shards"]}
        if self.manifest.get("state"):
            named.add(self.manifest["state"])
        for path in self.directory.iterdir():
            if path.name == self._manifest_file.name or not owns(self.rank, path.name):
                continue
            if path.name.startswith(".") or path.name not in named:
                path.unlink(missing_ok=True)

    def set_id_type(self, id_type: str) -> None:
        """Record whether ids are ``int`` or ``str`` (fixed by the first shard)."""
        current = self.manifest.get("id_type")
        if current is not None and current != id_type:
            raise StoreError(
                f"This store holds {current} ids; got {id_type} ids. Use one id type per store."
            )
        with self._lock:
            self.manifest["id_type"] = id_type

    @property
    def committed_rows(self) -> int:
        with self._lock:
            return sum(s["rows"] for s in self.manifest["shards"])

    # ---- public API -------------------------------------------------------------------
    def submit(
        self,
        rows: torch.Tensor,
        ids: list[str],
        positions: np.ndarray | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Queue one shard; blocks while ``queue_shards`` shards are already waiting."""
        self._raise_if_failed()
        if self._closed:
            raise StoreError("The shard writer is closed.")
        if rows.shape[0] != len(ids):
            raise StoreError(f"{rows.shape[0]} rows but {len(ids)} ids.")
        self._queue.put(_Job(rows, list(ids), positions, state))
        self._raise_if_failed()

    def flush(self) -> None:
        """Wait until every submitted shard is committed."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._lease.release()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop the thread without raising (used while another error propagates)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            self._lease.release()

    # ---- thread ---------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreError(f"Writing the store {self.directory} failed: {self._error!r}") from self._error

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._commit(job)
            except BaseException as exc:  # surfaced in the caller, never swallowed
                self._error = exc
            finally:
                self._queue.task_done()

    def _commit(self, job: _Job) -> None:
        index = self.manifest.get("next_index", len(self.manifest["shards"]))
        name = shard_name(self.rank, index)
        self._write_shard(self.directory / name, job)
        saved = None
        if job.state is not None:
            saved = state_name(self.rank, index)
            tmp = self.directory / f".{saved}.tmp"
            save_tensors(tmp, job.state)
            fsync_file(tmp)
            os.replace(tmp, self.directory / saved)
        fsync_dir(self.directory)
        entry = {"file": name, "rows": len(job.ids), **shard_digest(self.directory / name)}
        old_state = self.manifest.get("state")
        with self._lock:
            manifest = dict(self.manifest)
            manifest["shards"] = [*self.manifest["shards"], entry]
            manifest["next_index"] = index + 1
            if saved is not None:
                digest = file_digest(self.directory / saved)
                manifest.update(state=saved, state_bytes=digest["bytes"], state_xxh3=digest["xxh3"])
            self.manifest = write_manifest(self._manifest_file, manifest)
        if saved is not None and old_state and old_state != saved:
            (self.directory / old_state).unlink(missing_ok=True)

    def _write_shard(self, final: Path, job: _Job) -> None:
        if is_quantized(self.dtype):
            codes, scales = quantize(job.rows, self.layout, self.dtype)
            write_shard_file(final, codes, job.ids, job.positions, self.dtype, scales)
            return
        write_shard_file(final, to_numpy(job.rows), job.ids, job.positions, self.dtype)


def write_shard_file(final: Path, rows: np.ndarray, ids: list, positions: np.ndarray | None, dtype: str,
                     scales: np.ndarray | None = None) -> None:
    """Write one shard under a hidden temporary name, fsync it, and rename it to ``final``
    (``scales``: those of a quantized store's codes)."""
    tmp = final.with_name(f".{final.name}.tmp")
    with h5py.File(tmp, "w") as fh:
        fh.create_dataset("rows", data=rows)
        if scales is not None:
            fh.create_dataset("scales", data=scales.astype(np.float32))
        fh.create_dataset("ids", data=np.array([str(i) for i in ids], dtype=object), dtype=h5py.string_dtype())
        if positions is not None:
            fh.create_dataset("positions", data=positions.astype(np.int64))
        fh.attrs["dtype"] = dtype
    fsync_file(tmp)
    os.replace(tmp, final)


def drop_rows(directory: Path, rank: int, ids: set, per_token: bool) -> int:
    """Remove every row whose id is in ``ids`` from the committed shards of writer ``rank``.

    Crash-safe like a commit: each affected shard is rewritten under a new name, the manifest is
    replaced to name it instead of the old one, and only then is the old file deleted (a crash
    leaves either shard committed, never both, never a partial one). The writer must be closed.
    Returns the number of rows removed."""
    directory = Path(directory)
    manifest = read_rank_manifest(directory, rank)
    if manifest is None:
        return 0
    id_type = manifest.get("id_type")
    removed = 0
    for position, entry in enumerate(list(manifest["shards"])):
        path = directory / entry["file"]
        with h5py.File(path, "r") as fh:
            raw_ids = [x.decode() if isinstance(x, bytes) else str(x) for x in fh["ids"][()]]
            keys = [int(x) for x in raw_ids] if id_type == IdType.INT else raw_ids
            keep = np.array([k not in ids for k in keys], dtype=bool)
            if keep.all():
                continue
            rows = fh["rows"][()][keep]
            scales = fh["scales"][()][keep] if "scales" in fh else None
            positions = fh["positions"][()][keep] if per_token else None
            dtype = fh.attrs.get("dtype", manifest["dtype"])
        index = manifest.get("next_index", len(manifest["shards"]))
        name = shard_name(rank, index)
        write_shard_file(directory / name, rows, [k for k, m in zip(keys, keep) if m], positions, dtype, scales)
        fsync_dir(directory)
        shards = list(manifest["shards"])
        shards[position] = {"file": name, "rows": int(keep.sum()), **shard_digest(directory / name)}
        manifest = write_manifest(directory / manifest_name(rank),
                                  {**manifest, "shards": shards, "next_index": index + 1})
        path.unlink(missing_ok=True)
        removed += int((~keep).sum())
    return removed


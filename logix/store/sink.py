"""One store being written by a run: id bookkeeping, row buffer, and its shard writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from logix.config import DuplicatePolicy
from logix.errors import BatchError, DuplicateIdError
from logix.store.format import Layout, read_manifest
from logix.store.reader import Store
from logix.store.writer import ShardWriter


def committed_ids(directory: Path) -> tuple[set, str | None]:
    """Ids already committed in a store directory, and their type."""
    manifest = read_manifest(directory)
    if manifest is None or not manifest["shards"]:
        return set(), None if manifest is None else manifest.get("id_type")
    return set(Store(directory).ids), manifest.get("id_type")


class StoreSink:
    """Buffers whole batches of rows and commits them as shards of ``shard_rows`` or more.

    ``state`` (called at each commit) is saved with the shard, so that what it describes
    (running statistics) always matches exactly the committed rows.
    """

    def __init__(
        self,
        directory: Path,
        layout: Layout,
        dtype: str,
        per_token: bool,
        shard_rows: int,
        queue_shards: int,
        duplicates: DuplicatePolicy,
        state: Callable[[], dict[str, Tensor]] | None = None,
        rank: int = 0,
    ) -> None:
        self.directory = directory
        self.writer = ShardWriter(directory, layout, dtype, per_token, queue_shards, rank)
        self.committed, self.id_type = committed_ids(directory)
        self.shard_rows = shard_rows
        self.duplicates = duplicates
        self.state = state
        self.per_token = per_token
        self.seen: set = set()
        self.skipped_duplicates = 0
        self._buffer: list[tuple[Tensor, list, np.ndarray | None]] = []
        self._rows = 0

    @property
    def state_file(self) -> Path | None:
        name = self.writer.manifest.get("state")
        return self.directory / name if name else None

    def pending(self, ids: list) -> list:
        return [i for i in ids if i not in self.committed and i not in self.seen]

    def check_id_type(self, id_type: str) -> None:
        if self.id_type is None:
            self.id_type = id_type
            self.writer.set_id_type(id_type)
        elif self.id_type != id_type:
            raise BatchError(f"This store holds {self.id_type} ids; got {id_type} ids.")

    def keep_mask(self, ids: list) -> Tensor:
        """Which examples of a batch are new: committed ids are skipped, repeats follow the policy."""
        keep = torch.ones(len(ids), dtype=torch.bool)
        in_batch: set = set()
        for i, key in enumerate(ids):
            if key in self.committed:
                keep[i] = False
            elif key in self.seen or key in in_batch:
                if self.duplicates is DuplicatePolicy.ERROR:
                    raise DuplicateIdError(
                        f"Id {key!r} was already logged in this run. Ids must be unique; set "
                        "store.duplicate_ids=skip to keep the first row and drop repeats."
                    )
                keep[i] = False
                self.skipped_duplicates += 1
            in_batch.add(key)
        return keep

    def add(self, rows: Tensor, ids: list, positions: np.ndarray | None, new_ids: list) -> None:
        """Buffer one batch's rows; commit a shard once ``shard_rows`` rows are waiting."""
        self._buffer.append((rows, ids, positions))
        self._rows += rows.shape[0]
        self.seen.update(new_ids)
        if self._rows >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        rows = torch.cat([b[0] for b in self._buffer])
        ids = [i for b in self._buffer for i in b[1]]
        positions = np.concatenate([b[2] for b in self._buffer]) if self.per_token else None
        self._buffer.clear()
        self._rows = 0
        self.writer.submit(rows, ids, positions, state=None if self.state is None else self.state())

    def close(self) -> None:
        """Commit what is buffered and wait for the writer."""
        try:
            self.flush()
        finally:
            self.writer.close()

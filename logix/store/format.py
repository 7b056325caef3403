"""On-disk format shared by the writer and the reader.

A store is a directory::

    manifest.json              the commit record (replaced atomically)
    shard-000000.h5            committed shards, named in the manifest
    state-000000.safetensors   optional state saved with a shard (running statistics)

Each shard holds ``rows`` (n x dim, the store dtype; bfloat16 as raw uint16 bits),
``ids`` (UTF-8 strings) and, for per-token stores, ``positions`` (int64). The
manifest holds the row layout: one block per module, ``(k_out, k_in)`` flattened
row-major at ``offset``. A shard exists for readers only once the manifest names it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Block:
    """Where one module's gradient lives inside a row."""

    name: str
    kind: str
    shape: tuple[int, int]  # (k_out, k_in): logged gradient, canonical orientation
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.size)


@dataclass(frozen=True)
class Layout:
    """The row layout: every module's block, concatenated."""

    blocks: tuple[Block, ...]

    @classmethod
    def build(cls, entries: list[tuple[str, str, tuple[int, int]]]) -> Layout:
        blocks, offset = [], 0
        for name, kind, shape in entries:
            blocks.append(Block(name, kind, (int(shape[0]), int(shape[1])), offset))
            offset += shape[0] * shape[1]
        return cls(tuple(blocks))

    @property
    def dim(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"No module {name!r} in this store. Modules: {self.names}.")

    def to_json(self) -> list[dict[str, Any]]:
        return [{**asdict(b), "shape": list(b.shape)} for b in self.blocks]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Layout:
        return cls(tuple(Block(d["name"], d["kind"], tuple(d["shape"]), d["offset"]) for d in data))


def to_numpy(rows: torch.Tensor) -> np.ndarray:
    """Rows as a numpy array HDF5 can store (bfloat16 as its raw 16 bits)."""
    rows = rows.detach().cpu().contiguous()
    if rows.dtype == torch.bfloat16:
        return rows.view(torch.int16).numpy().view(np.uint16)
    return rows.numpy()


def from_numpy(array: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    with open(path) as fh:
        return json.load(fh)

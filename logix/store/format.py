"""On-disk format shared by the writer and the reader.

A store is a directory::

    manifest.json              the commit record (replaced atomically)
    shard-000000.h5            committed shards, named in the manifest
    state-000000.safetensors   optional state saved with a shard (running statistics)

Under ``torch.distributed`` every rank is a writer of its own: rank 0 writes the files above,
rank ``r > 0`` writes ``manifest.rank-0000r.json``, ``shard-r0000r-000000.h5`` and
``state-r0000r-000000.safetensors``. Writers never touch each other's files, so no two
processes ever replace the same file; a reader merges every rank's manifest into one logical
store (rank 0's shards first, then rank 1's, ...).

Each shard holds ``rows`` (n x dim, the store dtype; bfloat16 as raw uint16 bits; for the
quantized dtypes int8 / int4 the codes, with ``scales``, see :mod:`logix.store.quant`),
``ids`` (UTF-8 strings) and, for per-token stores, ``positions`` (int64). The
manifest holds the row layout: one block per module, ``(k_out, k_in)`` flattened
row-major at ``offset``. A shard exists for readers only once the manifest names it.

Integrity: each shard entry records the shard file's byte size (``bytes``) and the xxh3-128
hashes of its two parts, the rows' bytes (``data``: ``[offset, length]`` in the file;
``xxh3_data``) and every other byte (headers, ids, scales, positions: ``xxh3_meta``),
so that a reader can check the ids of a shard before its rows (:mod:`logix.store.integrity`).
The state file is recorded the same way (``state_bytes``, ``state_xxh3``). Every manifest
carries ``checksum``, the xxh3-128 hash of its own canonical JSON without that key; a
manifest that is not valid JSON, lacks a key, has a value of the wrong type, or does not match
its checksum is refused (:class:`~logix.errors.StoreError` naming the file).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import xxhash

from logix.config.choices import ChoiceEnum, StoreDtype
from logix.core.checksum import damaged
from logix.core.dtypes import DISK_DTYPES, QUANTIZED_DTYPES
from logix.errors import StoreError

FORMAT_VERSION = 2  # 2: shard, state and manifest checksums
MANIFEST = "manifest.json"
CHECKSUM = "checksum"


class IdType(ChoiceEnum):
    """The type of a store's ids (the manifest's ``id_type``), fixed by its first shard."""

    INT = "int"
    STR = "str"


@dataclass(frozen=True)
class Block:
    """Where one module's gradient lives inside a row.

    Attributes:
        name: The module's name.
        kind: Its layer kind (``linear``, ``conv1d``, ``embedding``, ``conv2d``).
        shape: ``(k_out, k_in)``: the logged gradient block, in canonical orientation (output
            gradient side first); ``row[columns].reshape(shape)`` is that block.
        offset: The block's first column in the row.
    """

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
    """The row layout: every module's block, concatenated in this order.

    Attributes:
        blocks: The modules' blocks, in row order.
    """

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
    if dtype == StoreDtype.BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON (written under a temporary name, fsynced, renamed).
    NaN / Inf are refused (they are not JSON): a ``ValueError`` names the file."""
    with atomic_file(path) as fh:
        try:
            json.dump(data, fh, indent=1, allow_nan=False)
        except ValueError as exc:
            raise ValueError(f"Cannot write {path}: a value is NaN or Inf ({exc}).") from exc


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[IO]:
    """Open a hidden temporary file beside ``path``; on a clean exit it is fsynced and renamed to
    ``path``, on an error removed (``path`` keeps its earlier content, or stays absent)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk (before renaming it into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def manifest_name(rank: int = 0) -> str:
    """The manifest file of the writer ``rank`` (rank 0: ``manifest.json``)."""
    return MANIFEST if rank == 0 else f"manifest.rank-{rank:05d}.json"


def file_prefix(rank: int = 0) -> str:
    """The prefix after ``shard-`` / ``state-`` of the files of writer ``rank``."""
    return "" if rank == 0 else f"r{rank:05d}-"


def shard_name(rank: int, index: int) -> str:
    """The file of writer ``rank``'s shard number ``index``."""
    return f"shard-{file_prefix(rank)}{index:06d}.h5"


def state_name(rank: int, index: int) -> str:
    """The state file saved with writer ``rank``'s shard number ``index``."""
    return f"state-{file_prefix(rank)}{index:06d}.safetensors"


_RANK_MANIFEST = re.compile(r"^manifest\.rank-(\d{5})\.json$")


def owns(rank: int, name: str) -> bool:
    """Whether the file ``name`` of a store directory belongs to writer ``rank``."""
    if name.lstrip(".").startswith(manifest_name(rank)):
        return True
    pattern = rf"^\.?(shard|state)-{re.escape(file_prefix(rank))}\d{{6}}\.(h5|safetensors)(\.tmp)?$"
    return re.match(pattern, name) is not None


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """xxh3-128 (hex) of a manifest's canonical JSON (sorted keys, no ``checksum``)."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Replace the manifest ``path`` atomically with ``manifest`` and its checksum (returned)."""
    manifest = {**{k: v for k, v in manifest.items() if k != CHECKSUM}, CHECKSUM: manifest_checksum(manifest)}
    write_json_atomic(path, manifest)
    return manifest


_SHARD_FILE = re.compile(r"^shard-(r\d{5}-)?\d{6}\.h5$")
_STATE_FILE = re.compile(r"^state-(r\d{5}-)?\d{6}\.safetensors$")
_TOP = {"format": int, "layout": list, "dim": int, "dtype": str, "per_token": bool, "shards": list,
        CHECKSUM: str}
_SHARD = {"file": str, "rows": int, "bytes": int, "xxh3_meta": str, "xxh3_data": str}


def _typed(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _count(value: Any) -> bool:
    return _typed(value, int) and value >= 0


def manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest (None when it is a valid, untouched one)."""
    if not isinstance(manifest, dict):
        return f"a manifest is a JSON object, not {type(manifest).__name__}"
    if manifest.get("format") != FORMAT_VERSION:
        return (f"format {manifest.get('format')!r}; this logix reads format {FORMAT_VERSION} "
                "(stores with checksums)")
    for key, kind in _TOP.items():
        if key not in manifest:
            return f"the key {key!r} is missing"
        if not _typed(manifest[key], kind):
            return f"{key!r} is {manifest[key]!r}, not a {kind.__name__}"
    if manifest[CHECKSUM] != manifest_checksum(manifest):
        return (f"its content does not match its checksum (xxh3-128 {manifest_checksum(manifest)}, "
                f"recorded {manifest[CHECKSUM]}): it was edited or damaged")
    if manifest["dtype"] not in [*DISK_DTYPES, *QUANTIZED_DTYPES]:
        return f"dtype {manifest['dtype']!r} is not a store dtype"
    if manifest.get("id_type") not in (None, *[t.value for t in IdType]):
        return f"id_type {manifest.get('id_type')!r} is not int, str or null"
    if "next_index" in manifest and not _count(manifest["next_index"]):
        return f"next_index is {manifest['next_index']!r}"
    try:
        layout = Layout.from_json(manifest["layout"])
        shapes_ok = all(len(b.shape) == 2 and all(map(_count, b.shape)) and _count(b.offset)
                        and isinstance(b.name, str) for b in layout.blocks)
    except (KeyError, TypeError, AttributeError, IndexError):
        shapes_ok = False
    if not shapes_ok or layout.dim != manifest["dim"]:
        return "its layout is not a list of blocks (name, kind, shape, offset) that add up to dim"
    for i, shard in enumerate(manifest["shards"]):
        where = f"shard entry {i}"
        if not isinstance(shard, dict):
            return f"{where} is not an object"
        for key, kind in _SHARD.items():
            if not _typed(shard.get(key), kind) or (kind is int and shard[key] < 0):
                return f"{where}: {key!r} is {shard.get(key)!r}, not a {'count' if kind is int else kind.__name__}"
        if not _SHARD_FILE.match(shard["file"]):
            return f"{where}: {shard['file']!r} is not a shard file name"
        data = shard.get("data")
        if data is not None and not (isinstance(data, list) and len(data) == 2 and all(map(_count, data))
                                     and data[0] + data[1] <= shard["bytes"]):
            return f"{where}: 'data' is {data!r}, not [offset, length] inside the file"
    state = manifest.get("state")
    if state is not None and not (isinstance(state, str) and _STATE_FILE.match(state)
                                  and _count(manifest.get("state_bytes"))
                                  and _typed(manifest.get("state_xxh3"), str)):
        return f"state {state!r} is not a state file name with state_bytes and state_xxh3"
    return None


def read_rank_manifest(directory: Path, rank: int = 0) -> dict[str, Any] | None:
    """The manifest of one writer, or None when that writer committed nothing yet.

    Raises :class:`~logix.errors.StoreError` naming the file when it is not valid JSON or is
    not a valid manifest (see :func:`manifest_problem`)."""
    path = Path(directory) / manifest_name(rank)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"Cannot read the manifest {path}: {exc}.") from exc
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(path, f"not valid JSON ({exc})") from exc
    problem = manifest_problem(manifest)
    if problem is not None:
        raise damaged(path, problem)
    return manifest


def manifest_ranks(directory: Path) -> list[int]:
    """The writers (ranks) that have a manifest in ``directory``, in rank order."""
    directory = Path(directory)
    ranks = [0] if (directory / MANIFEST).exists() else []
    if directory.is_dir():
        ranks += sorted(int(m.group(1)) for p in directory.iterdir() if (m := _RANK_MANIFEST.match(p.name)))
    return ranks


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The store's manifest: every writer's committed shards merged into one logical store.

    With one writer this is ``manifest.json`` itself. With several (one per rank) the shards
    come in rank order, and each shard entry gains its ``rank``; layout, dtype and the per-token
    flag must agree between writers (a reader refuses a store they disagree on).
    """
    ranks = manifest_ranks(Path(directory))
    if not ranks:
        return None
    manifests = [(r, read_rank_manifest(directory, r)) for r in ranks]
    manifests = [(r, m) for r, m in manifests if m is not None]
    if not manifests:  # removed between listing and reading (an overwrite in progress)
        return None
    if len(manifests) == 1 and manifests[0][0] == 0:
        return manifests[0][1]
    merged = dict(manifests[0][1])
    merged["shards"] = []
    merged["ranks"] = [r for r, _ in manifests]
    merged["state"] = None
    for rank, m in manifests:
        for key in ("layout", "dtype", "per_token"):
            if m[key] != merged[key]:
                raise StoreError(
                    f"Store {directory}: rank {rank} wrote a different {key} than rank "
                    f"{manifests[0][0]} ({m[key]!r} vs {merged[key]!r}); the ranks ran different configs."
                )
        if m.get("id_type") is not None:
            if merged.get("id_type") not in (None, m["id_type"]):
                raise StoreError(f"Store {directory}: ranks logged both int and str ids.")
            merged["id_type"] = m["id_type"]
        merged["shards"] += [{**s, "rank": rank} for s in m["shards"]]
    return merged

"""The pool of candidate instruction samples: reading it, naming its examples, writing subsets.

A pool comes from a JSON Lines file (one Alpaca-style record per line), a JSON file holding a
list of records, or a Hugging Face ``datasets`` dataset stored locally (a ``save_to_disk``
directory, or a ``.parquet`` / ``.csv`` / ``.arrow`` file). Records are kept exactly as read, so
that an exported subset is in the input's own format: same keys, same values, same order of keys.

Example ids come from the record's id field when every record has one, and otherwise from a
content hash of the record (stable across processes and machines), so that scores computed by
different methods and runs join on the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logix.data import load_jsonl
from logix.errors import DataError

DATASET_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def record_id(record: Mapping[str, Any]) -> str:
    """A content id for a record: 16 hex characters of BLAKE2b over its canonical JSON.

    Args:
        record: The record (keys sorted for the hash: the same content, the same id).

    Returns:
        The id.
    """
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def record_ids(records: Sequence[Mapping[str, Any]], id_field: str = "id") -> list:
    """Ids of records: ``record[id_field]`` when every record has one, content hashes when none do.

    Args:
        records: The records.
        id_field: The id field's name.

    Returns:
        One id per record (:func:`record_id` when no record has the field).

    Raises:
        DataError: Only some records have the id field, an id is not a str/int, or ids repeat.
    """
    present = [isinstance(r, Mapping) and id_field in r for r in records]
    if any(not isinstance(r, Mapping) for r in records):
        bad = next(i for i, r in enumerate(records) if not isinstance(r, Mapping))
        raise DataError(f"record {bad} is a {type(records[bad]).__name__}, not a JSON object")
    if all(present) and records:
        ids = [r[id_field] for r in records]
        for i, value in enumerate(ids):
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise DataError(f"record {i}: id {value!r} must be a string or an integer")
    elif any(present):
        missing = present.index(False)
        raise DataError(f"record {missing} has no {id_field!r} field but others do; give every record "
                        "an id, or remove them all to use content hashes")
    else:
        ids = [record_id(r) for r in records]
    seen: dict = {}
    for i, value in enumerate(ids):
        if value in seen:
            raise DataError(f"records {seen[value]} and {i} have the same id {value!r}; ids must be unique "
                            "(identical records without an id field are duplicates: remove one)")
        seen[value] = i
    return ids


@dataclass
class Pool:
    """Records of a candidate pool with their ids, and where they came from (:func:`load_pool`).

    Attributes:
        records: The records, in file order.
        ids: One id per record (:func:`record_ids`).
        source: The file or dataset they were read from.
        format: ``jsonl``, ``json`` or ``dataset``: how :func:`export_selection` writes a subset.
    """

    records: list[dict[str, Any]]
    ids: list
    source: str = ""
    format: str = "jsonl"  # jsonl | json | dataset

    def __len__(self) -> int:
        return len(self.records)

    def index(self) -> dict:
        """id -> position."""
        return {key: i for i, key in enumerate(self.ids)}

    def subset(self, ids: Sequence) -> list[dict[str, Any]]:
        """The records with these ids, in the given order.

        Raises:
            DataError: An id is not in the pool.
        """
        where = self.index()
        missing = [i for i in ids if i not in where]
        if missing:
            raise DataError(f"{len(missing)} id(s) are not in the pool {self.source or ''}, e.g. {missing[0]!r}; "
                            "were the scores computed on another file?")
        return [self.records[where[i]] for i in ids]


def load_pool(source: str | Path | Sequence[Mapping[str, Any]] | Any, id_field: str = "id") -> Pool:
    """Read a pool of records.

    Args:
        source: A ``.jsonl`` file, a ``.json`` file holding a list of objects, a directory written by
            ``datasets.Dataset.save_to_disk``, a ``.parquet`` / ``.csv`` / ``.arrow`` file, an in-memory
            ``datasets.Dataset``, or a list of records.
        id_field: The record field holding example ids (content hashes are used when absent).

    Raises:
        DataError: The file is missing, malformed, or its records cannot be named (see :func:`record_ids`).
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        records, fmt = _read_path(path)
        name = str(path)
    elif hasattr(source, "to_list") and hasattr(source, "column_names"):
        records, fmt, name = list(source.to_list()), "dataset", "<datasets.Dataset>"
    elif isinstance(source, Sequence) and not isinstance(source, str | bytes):
        records, fmt, name = [dict(r) if isinstance(r, Mapping) else r for r in source], "jsonl", "<records>"
    else:
        raise DataError(f"cannot read a pool from a {type(source).__name__}; pass a .jsonl/.json file, a "
                        "datasets directory or file, a datasets.Dataset, or a list of dicts")
    if not records:
        raise DataError(f"{name}: the pool is empty")
    return Pool(records, record_ids(records, id_field), name, fmt)


def _read_path(path: Path) -> tuple[list[dict[str, Any]], str]:
    if path.is_dir():
        return _read_dataset(path, None), "dataset"
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path), "jsonl"
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return load_jsonl(path), "jsonl"  # JSON Lines saved with a .json suffix
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read it: {e}") from e
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"train": [...]}
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
        return data, "json"
    if suffix in DATASET_SUFFIXES:
        return _read_dataset(path, DATASET_SUFFIXES[suffix]), "dataset"
    raise DataError(f"{path}: unknown pool format {suffix!r}; use .jsonl, .json, .parquet, .csv, .arrow "
                    "or a datasets save_to_disk directory")


def _read_dataset(path: Path, builder: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{path}: reading it needs the `datasets` package: pip install 'logix-attribution[datasets]'") from e
    try:
        if builder is None:
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many unrelated types
        raise DataError(f"{path}: cannot load it with datasets: {e}") from e
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise DataError(f"{path}: holds splits {sorted(data)}; save or pass one split")
        data = next(iter(data.values()))
    return list(data.to_list())


def write_records(path: str | Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write records atomically: JSON Lines, or a JSON list when ``path`` ends in ``.json``.

    The file appears complete or not at all (written to a temporary name, fsynced, then renamed).

    Args:
        path: The file to write (its folder is created).
        records: The records.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        if path.suffix.lower() == ".json":
            json.dump(list(records), fh, ensure_ascii=False, indent=1, default=str)
            fh.write("\n")
        else:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path

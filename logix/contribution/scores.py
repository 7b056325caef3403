"""A table of contribution scores: one row per pool example, one column per scoring method.

Every method (in-context, LESS, IFD, the baselines, a selector's prediction) produces one
column keyed by example id. Tables merge on ids, save as JSON Lines (``{"id": ..., "icl": ...}``,
types of ids preserved) or CSV, and are what :func:`logix.contribution.select` ranks.
Higher is better in every column logix writes (see docs/contribution.md for each score's meaning).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from logix.errors import DataError


@dataclass
class ScoreTable:
    """Scores by example id.

    Attributes:
        ids: Example ids, unique.
        columns: Score name -> float64 array aligned with ``ids`` (NaN where a method did not score).
    """

    ids: list
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        if len(set(self.ids)) != len(self.ids):
            raise DataError("score table ids must be unique")
        self.columns = {name: self._checked(name, values) for name, values in self.columns.items()}

    def _checked(self, name: str, values) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.shape[0] != len(self.ids):
            raise DataError(f"score {name!r} has {array.shape[0]} values for {len(self.ids)} ids")
        return array

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def add(self, name: str, values: Sequence[float] | np.ndarray) -> ScoreTable:
        """Add (or replace) a column aligned with ``ids``; returns self."""
        self.columns[name] = self._checked(name, values)
        return self

    def add_by_id(self, name: str, ids: Sequence, values: Sequence[float] | np.ndarray) -> ScoreTable:
        """Add a column given for some ids (others get NaN).

        Raises:
            DataError: An id is not in the table, or lengths differ.
        """
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(ids) != values.shape[0]:
            raise DataError(f"score {name!r}: {len(ids)} ids but {values.shape[0]} values")
        where = {key: i for i, key in enumerate(self.ids)}
        column = np.full(len(self.ids), np.nan)
        for key, value in zip(ids, values):
            if key not in where:
                raise DataError(f"score {name!r}: id {key!r} is not in the table")
            column[where[key]] = value
        self.columns[name] = column
        return self

    def column(self, name: str) -> np.ndarray:
        """One score column.

        Raises:
            DataError: Unknown name (the message lists the table's scores).
        """
        if name not in self.columns:
            raise DataError(f"no score named {name!r}; this table has {self.names or 'no scores'}")
        return self.columns[name]

    def as_dict(self, name: str) -> dict:
        return dict(zip(self.ids, self.column(name).tolist()))

    def records(self) -> list[dict]:
        out = []
        for i, key in enumerate(self.ids):
            row = {"id": key}
            for name, values in self.columns.items():
                v = float(values[i])
                row[name] = None if math.isnan(v) else v
            out.append(row)
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically as ``.jsonl`` (default) or ``.csv``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            if path.suffix.lower() == ".csv":
                writer = csv.writer(fh)
                writer.writerow(["id", *self.names])
                for row in self.records():
                    writer.writerow([row["id"], *("" if row[n] is None else repr(row[n]) for n in self.names)])
            else:
                for row in self.records():
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        """Read a table written by :meth:`save` (JSON Lines or CSV; CSV ids are strings).

        Raises:
            DataError: The file is missing or malformed.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such score file")
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as fh:
                rows = list(csv.DictReader(fh))
        else:
            from logix.data import load_jsonl

            rows = load_jsonl(path)
        if not rows:
            raise DataError(f"{path}: the score file is empty")
        if "id" not in rows[0]:
            raise DataError(f"{path}: rows need an 'id' field (found {sorted(rows[0])})")
        names = [k for k in rows[0] if k != "id"]
        try:
            columns = {n: np.array([_number(r.get(n)) for r in rows]) for n in names}
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: a score is not a number: {e}") from e
        return cls([r["id"] for r in rows], columns)

    def merge(self, other: ScoreTable) -> ScoreTable:
        """A new table with the union of ids (this table's order first) and of columns.

        Where both tables score an id under the same name, ``other``'s value wins unless it is NaN.
        """
        known = set(self.ids)
        merged = ScoreTable(list(self.ids) + [i for i in other.ids if i not in known])
        where = {key: i for i, key in enumerate(merged.ids)}
        for table in (self, other):
            rows = np.array([where[key] for key in table.ids], dtype=np.int64)
            for name, values in table.columns.items():
                column = merged.columns.setdefault(name, np.full(len(merged.ids), np.nan))
                ok = ~np.isnan(values)
                column[rows[ok]] = values[ok]
        return merged


def _number(value) -> float:
    """A score from a JSON value (null -> NaN) or a CSV cell (empty -> NaN)."""
    return math.nan if value in ("", None) else float(value)


def from_mapping(scores: Mapping[str, Mapping]) -> ScoreTable:
    """Build a table from ``{score_name: {id: value}}``."""
    ids: list = []
    seen: set = set()
    for values in scores.values():
        for key in values:
            if key not in seen:
                seen.add(key)
                ids.append(key)
    table = ScoreTable(ids)
    for name, values in scores.items():
        table.add_by_id(name, list(values), list(values.values()))
    return table

"""``logix verify`` / :func:`verify_path`: check every stored byte under a run, project or store
directory, and name each damaged file.

Every store found (a folder holding ``manifest.json`` or a rank's manifest) is checked whole by
:func:`~logix.store.integrity.store_problems` (manifests, every shard's size and hashes, dataset
shapes against the manifest, the state file, ids held by more than one row), and every
safetensors file (statistics, projections, scoring parts, optimizer moments) against the hash
recorded in it (:func:`~logix.core.checksum.load_tensors`). Hidden temporary files of an
interrupted write are not part of a run and are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from logix.core.checksum import load_tensors
from logix.errors import StoreError
from logix.store.format import MANIFEST, manifest_ranks, read_manifest
from logix.store.integrity import Problem, store_problems

TENSOR_SUFFIX = ".safetensors"


@dataclass
class Verification:
    """What :func:`verify_path` checked and what it found."""

    path: Path
    stores: list[Path] = field(default_factory=list)
    rows: int = 0
    files: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [str(p) for p in self.problems]
        verdict = "OK" if self.ok else f"{len(self.problems)} PROBLEM(S)"
        lines.append(f"{verdict}: {len(self.stores)} stores ({self.rows} rows) and {len(self.files)} tensor files "
                     f"checked under {self.path}")
        return "\n".join(lines)


def _store_dirs(path: Path) -> list[Path]:
    found = {p.parent for p in path.rglob("manifest*.json") if not p.name.startswith(".")}
    return sorted(d for d in found if manifest_ranks(d))


def verify_path(path: str | Path) -> Verification:
    """Check every store and tensor file under ``path`` (a run, project or store directory)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory: give a run, project or store directory to verify.")
    result = Verification(path)
    stores = _store_dirs(path)
    if not stores and not any(path.rglob(f"*{TENSOR_SUFFIX}")):
        raise StoreError(f"{path} holds no logix store or statistics (no {MANIFEST} below it).")
    for store in stores:
        result.stores.append(store)
        problems = store_problems(store)
        result.problems += problems
        if not problems:
            manifest = read_manifest(store)
            result.rows += sum(s["rows"] for s in manifest["shards"])
    for tensor_file in sorted(path.rglob(f"*{TENSOR_SUFFIX}")):
        if tensor_file.name.startswith("."):
            continue
        result.files.append(tensor_file)
        try:
            load_tensors(tensor_file)
        except StoreError as exc:
            result.problems.append(Problem(tensor_file, str(exc)))
    return result

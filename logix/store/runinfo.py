"""The run directory's record: resolved config, environment, passes done, watched modules."""

from __future__ import annotations

import functools
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from logix.config import Config
from logix.core.install import DISTRIBUTION
from logix.errors import BatchError, RunDirectoryError, WatchError
from logix.store.format import IdType, write_json_atomic
from logix.store.rundir import config_file, run_file, stores_dir


def environment_versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages a run depends on."""
    return dict(_versions_cached())


@functools.lru_cache(maxsize=1)
def _versions_cached() -> dict[str, str]:  # package metadata lookups cost ~10 ms per save
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("logix", "torch", "transformers", "peft", "accelerate", "h5py", "numpy"):
        try:
            out[pkg] = md.version(DISTRIBUTION if pkg == "logix" else pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


@dataclass
class RunInfo:
    """What ``run.json`` records; saved atomically on every change."""

    path: Path
    identity: dict[str, Any]
    passes: list[str]
    done: list[str] = field(default_factory=list)
    modules: list[dict[str, Any]] | None = None
    finalized: bool = False
    writer: bool = True  # under torch.distributed only rank 0 writes run.json
    # capture.nonfinite: skip — ids whose rows were not stored, by store, and the batches of each pass
    # that lost examples or statistics to NaN / Inf
    skipped_nonfinite: dict[str, list] = field(default_factory=dict)
    nonfinite_batches: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open_or_create(cls, run_dir: Path, config: Config, specs: Sequence) -> RunInfo:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_file(run_dir)
        identity = config.identity()
        passes = [s.name for s in specs]
        if path.exists():
            data = json.loads(path.read_text())
            changes = _diff(data["identity"], identity)
            if changes:
                raise RunDirectoryError(
                    f"{run_dir} holds a run with a different config ({'; '.join(changes)}). "
                    "Use another project name, or pass overwrite=True to delete the old run."
                )
            info = cls(path, identity, passes, data["done"], data.get("modules"), data["finalized"],
                       skipped_nonfinite=data.get("skipped_nonfinite", {}),
                       nonfinite_batches=data.get("nonfinite_batches", {}))
        else:
            info = cls(path, identity, passes)
        config.to_yaml(config_file(run_dir))
        info.save()
        return info

    def save(self) -> None:
        if not self.writer:
            return
        write_json_atomic(
            self.path,
            {
                "identity": self.identity,
                "passes": self.passes,
                "done": self.done,
                "modules": self.modules,
                "finalized": self.finalized,
                "skipped_nonfinite": self.skipped_nonfinite,
                "nonfinite_batches": self.nonfinite_batches,
                "environment": environment_versions(),
            },
        )

    def check_modules(self, modules: list[dict[str, Any]]) -> None:
        """Fix the watched modules on first use; a resumed run must watch the same ones."""
        if self.modules == modules:
            return
        if self.modules is None or (not self.done and not self._has_rows()):
            self.modules = modules
            self.save()
            return
        if self.modules != modules:
            old = [m["name"] for m in self.modules]
            new = [m["name"] for m in modules]
            raise WatchError(
                f"This run directory was logged with other modules ({len(old)}: {old[:5]}...) than "
                f"watch() selected now ({len(new)}: {new[:5]}...). Watch the same modules, or use "
                "a new project / overwrite=True."
            )

    def _has_rows(self) -> bool:
        return stores_dir(self.path.parent).exists()

    def mark_done(self, name: str) -> None:
        if name not in self.done:
            self.done.append(name)
            self.save()

    def mark_finalized(self) -> None:
        self.finalized = True
        self.save()


def normalise_ids(data_id: Sequence | Tensor) -> tuple[list, IdType]:
    """Ids as a list of python ints or strs, and which of the two they are."""
    if isinstance(data_id, Tensor):
        if data_id.dtype.is_floating_point or data_id.dim() != 1:
            raise BatchError("data_id tensors must be 1-D integer tensors (one id per example).")
        return [int(x) for x in data_id.tolist()], IdType.INT
    if isinstance(data_id, (str, bytes)) or not isinstance(data_id, Sequence):
        raise BatchError(
            f"data_id must be a sequence with one id per example, got {type(data_id).__name__}."
        )
    ids = list(data_id)
    if all(isinstance(x, str) for x in ids):
        return ids, IdType.STR
    if all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
        return ids, IdType.INT
    try:
        import numpy as np

        if all(isinstance(x, np.integer) for x in ids):
            return [int(x) for x in ids], IdType.INT
    except ImportError:  # numpy is a dependency; defensive only
        pass
    raise BatchError("data_id must hold only ints or only strings (one per example).")

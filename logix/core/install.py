"""Which distribution installed the ``logix`` package, and whether another one claims it too.

This project is published as the distribution ``logix-attribution`` and imported as ``logix``.
Two unrelated distributions install a top-level ``logix`` as well: ``logix`` (a logging utility,
one ``logix.py``) and ``logix-ai`` (the original LogIX, a ``logix/`` package). Installed into the
same environment, pip lets the last one overwrite the other's files without a warning, and
uninstalling either deletes the files both list. ``import logix`` warns when one of them is
installed (:func:`warn_on_conflicts`); the ``logix`` command refuses to run over files one of them
replaced (:func:`overwritten_message`).

The checks read directory listings first and package metadata only when a candidate is there:
``import logix`` takes about a millisecond longer and never imports torch.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import NamedTuple

__all__ = ["DISTRIBUTION", "FOREIGN_DISTRIBUTIONS", "Conflict", "InstallConflictWarning", "find_conflicts",
           "installed_version", "overwritten_message", "warn_on_conflicts"]

DISTRIBUTION = "logix-attribution"
"""The distribution name of this project on the package index (``pip install logix-attribution``)."""

FOREIGN_DISTRIBUTIONS = ("logix", "logix-ai")
"""Distributions of other projects known to install a top-level ``logix`` module or package."""



class InstallConflictWarning(UserWarning):
    """Another installed distribution also provides the top-level ``logix`` package."""


class Conflict(NamedTuple):
    """Another installed distribution that provides a top-level ``logix`` module or package.

    Attributes:
        name: Its distribution name (for instance ``logix-ai``).
        version: Its installed version.
        overwritten: Files of this project (paths relative to site-packages) whose content on disk
            no longer matches what this project installed, because the other distribution wrote
            its own file at the same path. Empty when this project's files are intact (for
            instance an editable install, or a foreign package in another directory).
    """

    name: str
    version: str
    overwritten: tuple[str, ...] = ()

    def message(self) -> str:
        """One line: which distribution conflicts, what it did, and the fix.

        Returns:
            The explanation, starting with ``the distribution NAME VERSION``.
        """
        if self.overwritten:
            what = f"and has overwritten {len(self.overwritten)} of this project's files ({self.overwritten[0]}, ...)"
        else:
            what = "(each install overwrites the other's files; uninstalling it deletes files they share)"
        return (f"the distribution {self.name} {self.version} also installs a top-level `logix` package "
                f"{what}; fix: pip uninstall -y {self.name}, then reinstall this project "
                f"(pip install --force-reinstall --no-deps {DISTRIBUTION}, or pip install -e . in a checkout)")


def installed_version() -> str:
    """The installed version of this project, read from the package metadata (no import of torch).

    Returns:
        The version string, or ``"(not installed)"`` when the source tree is used without an install.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed)"


def _is_candidate(entry: os.DirEntry) -> bool:
    """Whether a directory entry may be the metadata of a foreign distribution's install."""
    name = entry.name.lower()
    if not name.endswith((".dist-info", ".egg-info")) or name.split("-")[0].split(".")[0] not in ("logix", "logix_ai"):
        return False  # an egg-info without installed-files.txt is build metadata in a source checkout
    return name.endswith(".dist-info") or os.path.exists(os.path.join(entry.path, "installed-files.txt"))


def _candidates_on_path() -> bool:
    """Whether a metadata directory of a foreign distribution is in a ``sys.path`` directory."""
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as it:
                if any(_is_candidate(e) for e in it):
                    return True
        except OSError:
            continue
    return False


def _sha256(path) -> str:
    """A file's SHA-256 as a wheel's RECORD writes it (urlsafe base64, no padding)."""
    import base64
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _ours() -> dict:
    """This project's installed files by path, with the hashes recorded at install time."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        files = distribution(DISTRIBUTION).files or []
    except PackageNotFoundError:
        return {}
    return {str(f): f for f in files if f.hash is not None}


def find_conflicts() -> list[Conflict]:
    """The installed distributions of other projects that provide a top-level ``logix``.

    Only the names in :data:`FOREIGN_DISTRIBUTIONS` are looked for (checking every installed
    distribution's file list would take a noticeable fraction of a second).

    Returns:
        One :class:`Conflict` per such distribution; an empty list in a clean environment.
    """
    if not _candidates_on_path():
        return []
    from importlib.metadata import PackageNotFoundError, distribution

    out, ours = [], None
    for name in FOREIGN_DISTRIBUTIONS:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if dist.read_text("RECORD") is None and dist.read_text("installed-files.txt") is None:
            continue  # build metadata in a source checkout (an egg-info's SOURCES.txt), not an install
        shared = [f for f in dist.files or [] if f.parts and (f.parts[0] == "logix" or str(f) == "logix.py")]
        if not shared:  # an old record without files there (an editable install of this project)
            continue
        ours = _ours() if ours is None else ours
        overwritten = []
        for f in shared:
            mine = ours.get(str(f))
            if mine is not None and (not mine.locate().is_file() or _sha256(mine.locate()) != mine.hash.value):
                overwritten.append(str(f))
        out.append(Conflict(dist.metadata["Name"] or name, dist.version, tuple(overwritten)))
    return out


def warn_on_conflicts() -> None:
    """Warn (:class:`InstallConflictWarning`) once per distribution that also provides ``logix``."""
    for conflict in find_conflicts():
        warnings.warn(conflict.message(), InstallConflictWarning, stacklevel=3)


def overwritten_message() -> str | None:
    """The ``logix`` command's check: has another distribution replaced files of this project?

    Returns:
        The one-line explanation and fix when it has, else ``None``.
    """
    for conflict in find_conflicts():
        if conflict.overwritten:
            return conflict.message()
    return None

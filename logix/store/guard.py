"""What keeps a run directory safe from its users: plain project names, deletion of logix's own
directories only, and one writing process per directory.

**Names.** A project is a plain name below ``root``: no separator, not ``.`` / ``..``, not an
absolute path (:func:`check_project_name`), so ``root / project`` never leaves ``root``.

**Overwrite.** :func:`remove_owned` deletes a directory only when it lies strictly inside
``root`` and holds a logix marker (``run.json``, ``job.yaml`` or ``checkpoints.json``,
:func:`~logix.store.rundir.is_logix_dir`); anything else is refused with an error naming it.

**One writer.** :func:`acquire` takes an OS lock (``flock`` through the ``filelock`` package) on
``logix.lock`` in the directory and records the holder (pid, host, time) beside it. A second
process is refused at once with an error naming the holder's pid. The OS releases the lock when
its process dies, however it dies, so a stale lock of a dead process is simply taken over (the
stale owner file is rewritten). Within one process the lock is re-entrant (a notebook that runs
``logix.init`` twice on the same project keeps working); it is released when the last holder
releases it or is garbage collected.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from filelock import FileLock, Timeout

from logix.errors import ConfigError, RunDirectoryError
from logix.store.rundir import LOCK_FILE, is_logix_dir, lock_file, lock_owner_file

_SEPARATORS = ("/", "\\", "\0")


def check_project_name(project: object, what: str = "project") -> str:
    """``project`` as a plain directory name (no separator, not ``.`` or ``..``, not absolute),
    or a :class:`~logix.errors.ConfigError` naming the problem and the fix."""
    if not isinstance(project, str) or not project.strip():
        raise ConfigError(f"The {what} name must be a non-empty string, got {project!r}.")
    if any(s in project for s in _SEPARATORS) or project in (".", "..") or Path(project).is_absolute():
        raise ConfigError(
            f"The {what} name {project!r} is not a plain name: it may not hold a path separator, be '.' "
            f"or '..', or be absolute (it names a folder inside root). Set root to choose where runs go "
            f"and give {what} a plain name such as 'my_run'."
        )
    return project


def check_nested_name(name: str) -> str:
    """A name of plain parts joined by ``/`` (``project/model``: a run inside a project)."""
    for part in name.split("/"):
        check_project_name(part)
    return name


def check_removable(path: str | Path, root: str | Path) -> None:
    """Raise :class:`~logix.errors.RunDirectoryError` unless ``path`` is absent, empty, or a
    logix directory strictly inside ``root`` (it changes nothing)."""
    path, root = Path(path), Path(root)
    if not path.exists() and not path.is_symlink():
        return
    real, real_root = path.resolve(), root.resolve()
    if path.is_symlink() or real_root not in real.parents:
        raise RunDirectoryError(
            f"Refusing to delete {path}: it is not a directory inside root {root} (overwrite only removes "
            "logix runs inside root)."
        )
    if not real.is_dir() or (any(real.iterdir()) and not is_logix_dir(real)):
        raise RunDirectoryError(
            f"Refusing to delete {path}: it holds no logix run (no run.json, job.yaml, checkpoints.json or "
            "logix.lock), so overwrite will not remove it. Choose another project name, or delete it yourself."
        )


def remove_owned(path: str | Path, root: str | Path) -> None:
    """Delete ``path`` when it is empty or a logix directory strictly inside ``root``; refuse
    anything else, deleting nothing (:func:`check_removable`)."""
    check_removable(path, root)
    if Path(path).exists():
        shutil.rmtree(Path(path).resolve())


def open_directory(directory: str | Path, root: str | Path, overwrite: bool = False,
                   what: str = "run directory") -> Lease:
    """Take the writer's lock of ``directory`` (:func:`acquire`); with ``overwrite``, delete the
    directory first when it is logix's own (:func:`remove_owned`) and lock it anew. Whether it is
    logix's own is decided before the lock file can appear in it, and a refusal changes nothing."""
    if overwrite:
        check_removable(directory, root)
    lease = acquire(directory, what=what)  # refused while another process writes it
    if overwrite and any(not p.name.startswith(LOCK_FILE) for p in Path(directory).iterdir()):
        shutil.rmtree(Path(directory).resolve())
        lease = acquire(directory, what=what)
    return lease


class Lease:
    """A held lock of one directory; :meth:`release` (or garbage collection) gives it back."""

    def __init__(self, key: Path, entry: list) -> None:
        self.key, self.entry = key, entry
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            _release(self.key, self.entry)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: the OS releases the lock with the process
            return


_HELD: dict[Path, list] = {}  # lock path -> [FileLock, number of leases, inode of the locked file]
_GUARD = threading.RLock()  # re-entrant: a Lease collected by the GC inside acquire() releases safely


def _owner(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid is not recorded yet)"


def acquire(directory: str | Path, suffix: str = "", what: str = "run directory") -> Lease:
    """Take the writer's lock of ``directory`` for this process, or raise
    :class:`~logix.errors.RunDirectoryError` naming the process that holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = lock_file(directory, suffix).resolve()
    with _GUARD:
        if key in _HELD and _same_file(key, _HELD[key][2]):
            _HELD[key][1] += 1
            return Lease(key, _HELD[key])
        if key in _HELD:  # the directory was deleted and made anew (overwrite): lock the new file
            stale = _HELD.pop(key)
            stale[0].release(force=True)
        lock = FileLock(str(key), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = _owner(lock_owner_file(directory, suffix))
            raise RunDirectoryError(
                f"The {what} {directory} is being written by {holder}. Only one process may write a run "
                "directory at a time: wait for it to finish, stop it, or use another project name."
            ) from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = lock_owner_file(directory, suffix).with_suffix(".tmp")
        tmp.write_text(json.dumps(owner))
        os.replace(tmp, lock_owner_file(directory, suffix))
        entry = _HELD[key] = [lock, 1, os.stat(key).st_ino]
    return Lease(key, entry)


def _same_file(key: Path, inode: int) -> bool:
    try:
        return os.stat(key).st_ino == inode
    except FileNotFoundError:
        return False


def _release(key: Path, entry: list) -> None:
    with _GUARD:
        held = _HELD.get(key)
        if held is not entry:  # replaced after its directory was deleted
            return
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[key]
            held[0].release()

"""The ``logix`` console script: checks that ``logix`` is this project's package, then runs it.

Running ``import logix`` executes whichever ``logix/__init__.py`` Python finds first. When another
distribution has replaced this project's (``logix-ai`` installed afterwards writes its own
``logix/__init__.py``; a ``logix-ai`` or the logging utility ``logix`` in ``site-packages`` also
comes before an editable install), none of this project's code runs, so nothing inside the
``logix`` package can explain the failure. This module lives outside that package: it locates
``logix`` without importing it and, when the file found is not this project's, prints one line
naming the distribution that installed it and the fix, and exits 1. Otherwise it runs
:func:`logix.cli.main`.
"""

from __future__ import annotations

import sys

DISTRIBUTION = "logix-attribution"
FOREIGN_DISTRIBUTIONS = ("logix-ai", "logix")
MARKER = "logix.core.install"  # this project's logix/__init__.py imports it; no other does
_REINSTALL = (f"reinstall this project (pip install --force-reinstall --no-deps {DISTRIBUTION}, "
              "or pip install -e . in a checkout)")


def package_problem() -> str | None:
    """What is wrong with the ``logix`` that ``import logix`` would load, if anything.

    Returns:
        A one-line explanation with the fix when the ``logix`` found belongs to another project,
        or has no ``__init__.py`` (uninstalling another distribution that listed it deletes it);
        ``None`` when it is this project's package (or none is installed: the import then fails
        with Python's own message).
    """
    import importlib.util

    spec = importlib.util.find_spec("logix")  # finds the module without running it
    if spec is None:
        return None
    if spec.origin is None and spec.submodule_search_locations:  # a folder without __init__.py
        return (f"the `logix` package ({list(spec.submodule_search_locations)[0]}) has no __init__.py: "
                "uninstalling another distribution that also installed `logix` (logix-ai) deleted the files "
                f"both listed; fix: {_REINSTALL}")
    if not spec.origin or not spec.has_location:
        return None
    try:
        with open(spec.origin, encoding="utf-8", errors="replace") as f:
            if MARKER in f.read():
                return None
    except OSError:
        return None
    owner = _owner(spec.origin)
    fix = (f"pip uninstall -y {owner.split()[0]}, then " if owner else "") + _REINSTALL
    return (f"the `logix` package Python imports ({spec.origin}) is not this project's "
            f"({f'it belongs to {owner}' if owner else 'another project replaced it'}); fix: {fix}")


def _owner(origin: str) -> str | None:
    """``NAME VERSION`` of the known distribution whose file list holds ``origin``."""
    import os
    from importlib.metadata import PackageNotFoundError, distribution

    for name in FOREIGN_DISTRIBUTIONS:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for f in dist.files or []:
            try:
                if str(f) in ("logix/__init__.py", "logix.py") and os.path.samefile(f.locate(), origin):
                    return f"{dist.metadata['Name'] or name} {dist.version}"
            except OSError:  # listed, but not on this path
                continue
    return None


def main(argv: list[str] | None = None) -> int:
    """The ``logix`` command: refuse a foreign or damaged ``logix``, else run :func:`logix.cli.main`.

    An ``InstallConflictWarning`` raised while importing ``logix`` (another distribution also
    installs it, see :mod:`logix.core.install`) is printed as one line, ``logix: warning: ...``.

    Args:
        argv: The command line without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The command's exit status; 1 when ``logix`` is another project's package or lacks its
        ``__init__.py``.
    """
    problem = package_problem()
    if problem:
        print(f"logix: error: {problem}", file=sys.stderr)
        return 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the filters stay: only the output changes
        from logix.cli import main as logix_main
    for w in caught:
        if w.category.__name__ == "InstallConflictWarning":
            print(f"logix: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return logix_main(argv)

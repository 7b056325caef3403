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


def foreign_package() -> str | None:
    """Whether the ``logix`` that ``import logix`` would load belongs to another project.

    Returns:
        A one-line explanation with the fix when it does; ``None`` when it is this project's
        package (or none is installed: the import then fails with Python's own message).
    """
    import importlib.util

    spec = importlib.util.find_spec("logix")  # finds the module without running it
    if spec is None or not spec.origin or not spec.has_location:
        return None
    try:
        with open(spec.origin, encoding="utf-8", errors="replace") as f:
            if MARKER in f.read():
                return None
    except OSError:
        return None
    owner = _owner(spec.origin)
    fix = (f"pip uninstall -y {owner.split()[0]}, then " if owner else "") + (
        f"reinstall this project (pip install --force-reinstall --no-deps {DISTRIBUTION}, "
        "or pip install -e . in a checkout)")
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
    """The ``logix`` command: refuse a foreign ``logix`` package, else run :func:`logix.cli.main`.

    Args:
        argv: The command line without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The command's exit status; 1 when ``logix`` is another project's package.
    """
    problem = foreign_package()
    if problem:
        print(f"logix: error: {problem}", file=sys.stderr)
        return 1
    from logix.cli import main as logix_main

    return logix_main(argv)

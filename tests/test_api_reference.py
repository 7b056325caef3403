"""Every public name is in the API reference (docs/api/*.md), with a docstring.

The public names of a package are its ``__all__`` (of ``logix.errors`` and ``logix_console``, what
they define). A name counts as documented when a ``::: path`` entry of a docs page resolves, importing as
Python does, to the same object under the same name: ``::: logix.Config`` documents
``logix.config.Config`` too, and a name a package loads on first use is documented at the module
that defines it. The docstrings are read the way mkdocstrings renders them (griffe, statically), so
a dataclass without one does not pass on its generated ``Name(field, ...)`` text.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["logix", "logix.analysis", "logix.capture", "logix.cli", "logix.config", "logix.contribution",
            "logix.core.install", "logix.data", "logix.errors", "logix.integrations", "logix.report", "logix.store",
            "logix_console"]
ENTRY = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def _entries() -> dict[str, str]:
    """``{path: page}`` of every ``::: path`` entry of the API reference."""
    return {m.group(1): page.relative_to(ROOT).as_posix()
            for page in sorted((ROOT / "docs" / "api").glob("*.md")) for m in ENTRY.finditer(page.read_text())}


def _resolve(path: str):
    """The object ``path`` names, importing its longest importable module prefix (as mkdocstrings does)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


def _public_names(package: str) -> list[str]:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    if names is None:  # a module of definitions (logix.errors)
        names = [n for n, v in vars(module).items()
                 if not n.startswith("_") and getattr(v, "__module__", None) == package]
    return [n for n in names if not n.startswith("__")]


PUBLIC = [(package, name) for package in PACKAGES for name in _public_names(package)]


def _documenting_entries(package: str, name: str, entries: dict[str, str]) -> list[str]:
    obj = getattr(importlib.import_module(package), name)
    found = []
    for path in entries:
        if path.rsplit(".", 1)[-1] != name:
            continue
        try:
            if _resolve(path) is obj:
                found.append(path)
        except (ImportError, AttributeError):
            continue
    return found


def test_the_entries_are_found():
    entries = _entries()
    assert len(entries) > 150 and "logix.init" in entries and "logix.report.write_report" in entries


def test_an_entry_documents_the_object_it_resolves_to():
    assert _documenting_entries("logix.config", "Config", {"logix.Config": "p"}) == ["logix.Config"]
    assert _documenting_entries("logix.report", "load", {}) == []
    # `logix.analysis.influence` is also a module: an entry by that path documents the module
    assert _documenting_entries("logix.analysis", "influence", {"logix.analysis.influence": "p"}) == []
    assert _documenting_entries("logix.analysis", "influence", {"logix.analysis.api.influence": "p"})


def test_every_public_name_has_an_entry():
    entries = _entries()
    missing = [f"{package}.{name}" for package, name in PUBLIC if not _documenting_entries(package, name, entries)]
    assert not missing, ("public names without a `::: path` entry in docs/api/*.md (add one on the page of "
                         "their package; a name loaded on first use is documented at its defining module):\n  "
                         + "\n  ".join(missing))


def test_every_entry_resolves():
    bad = []
    for path, page in _entries().items():
        try:
            _resolve(path)
        except (ImportError, AttributeError) as exc:
            bad.append(f"{page}: ::: {path} ({exc})")
    assert not bad, "entries that name nothing:\n" + "\n".join(bad)


def _griffe_load(package: str):
    """The package as griffe (what mkdocstrings renders from) reads it."""
    import griffe

    loader = griffe.GriffeLoader(docstring_parser=griffe.Parser.google)
    root = loader.load(package)
    loader.resolve_aliases(implicit=False, external=False)
    return root


def test_every_documented_public_name_has_a_docstring():
    if importlib.util.find_spec("griffe") is None:
        if os.environ.get("LOGIX_CI"):
            pytest.fail("griffe is not installed: pip install -e '.[docs]' (the dev extra includes it)")
        pytest.skip("griffe is not installed (pip install -e '.[docs]')")
    roots = {}
    entries = _entries()
    bad = []
    for package, name in PUBLIC:
        for path in _documenting_entries(package, name, entries):
            top, _, rest = path.partition(".")
            if top not in roots:
                roots[top] = _griffe_load(top)
            target = roots[top][rest] if rest else roots[top]
            target = target.final_target if target.is_alias else target
            text = (target.docstring.value if target.docstring else "").strip()
            if not text:
                bad.append(f"{package}.{name} (::: {path} in {entries[path]})")
            elif inspect.isclass(getattr(importlib.import_module(package), name)) and target.kind.value != "class":
                bad.append(f"{package}.{name}: ::: {path} renders a {target.kind.value}, not the class")
    assert not bad, "public names without a docstring:\n  " + "\n  ".join(bad)

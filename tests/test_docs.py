"""The docs site builds with `mkdocs build --strict`: no broken link, no docstring warning."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("LOGIX_CI"):
            pytest.fail(f"{module} is not installed: pip install -e '.[docs]' (the dev extra includes it)")
        pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        _require(module)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, warnings
    for page in ("index.html", "report/index.html", "api/index.html", "faq/index.html", "benchmarks/index.html"):
        assert (tmp_path / "site" / page).exists(), page
    report = (tmp_path / "site" / "api" / "report" / "index.html").read_text()
    assert "write_report" in report and "plot_self_influence" in report
    assert "compute_influence" in (tmp_path / "site" / "api" / "analysis" / "index.html").read_text()


def _nav_pages(items: list) -> set[str]:
    """The pages of a mkdocs nav, its sections (a title over a list of pages) included."""
    out = set()
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out |= _nav_pages(value) if isinstance(value, list) else {value}
    return out


def test_every_docs_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = _nav_pages(config["nav"])
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == in_nav, f"pages not in mkdocs.yml's nav: {sorted(pages - in_nav)}; missing: {sorted(in_nav - pages)}"

"""Another distribution that installs a top-level ``logix`` (logix-ai, logix) is named, with the fix.

The foreign distributions are fakes: a ``*.dist-info`` folder (METADATA, RECORD) in a temporary
directory put on the path, as pip would leave it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from logix.cli import main
from logix.core.install import DISTRIBUTION, Conflict, find_conflicts, installed_version

ROOT = Path(__file__).resolve().parents[2]


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_dist(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = [f"{path},{_record_hash(data)},{len(data)}" for path, data in files.items()]
    (info / "RECORD").write_text("\n".join(record + [f"{info.name}/RECORD,,"]) + "\n")
    (info / "top_level.txt").write_text("logix\n")


def _import_logix(site: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-W", "always", "-c", "import logix"], capture_output=True, text=True,
                          env=env, cwd=site or ROOT, timeout=120)


def test_a_clean_environment_imports_without_a_warning():
    done = _import_logix(None)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert find_conflicts() == []


def test_import_warns_in_one_line_naming_the_foreign_distribution_and_the_fix(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "logix-ai", "0.1.1", {"logix/__init__.py": b"theirs", "logix/logix.py": b"theirs"})
    done = _import_logix(site)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "InstallConflictWarning" in lines[0] and "logix-ai 0.1.1" in lines[0]
    assert "pip uninstall -y logix-ai" in lines[0] and DISTRIBUTION in lines[0]


def test_the_logging_utility_named_logix_is_detected_by_its_logix_py(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_dist(site, "logix", "1.0.4", {"logix.py": b"def log(): ..."})
    monkeypatch.syspath_prepend(str(site))
    assert find_conflicts() == [Conflict("logix", "1.0.4", ())]


def test_an_old_record_without_logix_files_is_no_conflict(tmp_path, monkeypatch):
    site = tmp_path / "site"  # an editable install of this project under its former name
    _fake_dist(site, "logix", "0.1.0", {"__editable__.logix-0.1.0.pth": b"import finder"})
    monkeypatch.syspath_prepend(str(site))
    assert find_conflicts() == []


def test_the_cli_refuses_to_run_over_overwritten_files(tmp_path, monkeypatch, capsys):
    site = tmp_path / "site"
    ours, theirs = b'"""logix: which training data ..."""', b"from logix.logix import LogIX"
    (site / "logix" / "analysis").mkdir(parents=True)
    (site / "logix" / "analysis" / "__init__.py").write_bytes(theirs)  # logix-ai was installed last
    _fake_dist(site, DISTRIBUTION, "0.1.0", {"logix/analysis/__init__.py": ours, "logix/store/__init__.py": b""})
    _fake_dist(site, "logix-ai", "0.1.1", {"logix/analysis/__init__.py": theirs})
    monkeypatch.syspath_prepend(str(site))
    assert find_conflicts() == [Conflict("logix-ai", "0.1.1", ("logix/analysis/__init__.py",))]
    assert main(["--version"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("logix: error: the distribution logix-ai 0.1.1") and "\n" not in err
    assert "overwritten 1 of this project's files (logix/analysis/__init__.py" in err
    assert f"pip uninstall -y logix-ai, then reinstall this project (pip install --force-reinstall --no-deps {DISTRIBUTION}" in err


def test_version_reads_the_distribution_name():
    assert installed_version() not in ("", "(not installed)")
    done = subprocess.run([sys.executable, "-m", "logix.cli", "--version"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == f"logix {installed_version()} ({DISTRIBUTION})"


def test_build_metadata_in_a_source_checkout_is_no_conflict(tmp_path, monkeypatch):
    info = tmp_path / "checkout" / "logix.egg-info"  # left by a build of this project under its former name
    info.mkdir(parents=True)
    (info / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: logix\nVersion: 0.1.0\n")
    (info / "SOURCES.txt").write_text("logix/__init__.py\nlogix/errors.py\n")
    monkeypatch.syspath_prepend(str(info.parent))
    assert find_conflicts() == []


def _console(site: Path, *args: str) -> subprocess.CompletedProcess:
    """The ``logix`` console script's entry point, with ``site`` first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    code = f"import sys; from logix_console import main; sys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=site,
                          timeout=120)


def test_the_console_script_names_a_foreign_logix_package_that_replaced_ours(tmp_path):
    site = tmp_path / "site"  # logix-ai installed after this project: its logix/__init__.py is the one found
    theirs = b"from logix.logix import LogIX\n"
    (site / "logix").mkdir(parents=True)
    (site / "logix" / "__init__.py").write_bytes(theirs)
    _fake_dist(site, "logix-ai", "0.1.1", {"logix/__init__.py": theirs})
    done = _console(site, "--version")
    assert done.returncode == 1 and done.stdout == ""
    err = done.stderr.strip()
    assert "\n" not in err and err.startswith("logix: error: the `logix` package Python imports")
    assert "it belongs to logix-ai 0.1.1" in err and "pip uninstall -y logix-ai, then reinstall" in err


def test_the_console_script_names_the_logging_utility_logix(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "logix.py").write_bytes(b"def log(): ...\n")
    _fake_dist(site, "logix", "1.0.4", {"logix.py": b"def log(): ...\n"})
    done = _console(site, "--version")
    assert done.returncode == 1 and "it belongs to logix 1.0.4" in done.stderr


def test_the_console_script_runs_this_projects_cli(tmp_path):
    (tmp_path / "site").mkdir()
    done = _console(tmp_path / "site", "--version")
    assert done.returncode == 0 and done.stdout.strip() == f"logix {installed_version()} ({DISTRIBUTION})"
    assert done.stderr == ""


def test_the_console_script_names_a_logix_package_without_its_init(tmp_path):
    site = tmp_path / "site"  # `pip uninstall logix-ai` deleted the logix/__init__.py both listed
    (site / "logix" / "cli").mkdir(parents=True)
    (site / "logix" / "cli" / "__init__.py").write_text("")
    done = _console(site, "--version")
    assert done.returncode == 1 and "\n" not in done.stderr.strip()
    assert "has no __init__.py" in done.stderr and f"pip install --force-reinstall --no-deps {DISTRIBUTION}" in done.stderr


def test_the_console_script_prints_the_conflict_warning_as_one_line(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "logix-ai", "0.1.1", {"logix/__init__.py": b"theirs"})
    done = _console(site, "--version")
    assert done.returncode == 0 and done.stdout.startswith("logix ")
    assert done.stderr.startswith("logix: warning: the distribution logix-ai 0.1.1 also installs")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr

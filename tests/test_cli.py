"""The ``logix`` command line: every command in a subprocess, its files and its exit codes."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import logix
from logix.cli import main

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


def logix_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "logix.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture
def job_config(tmp_path) -> Path:
    """A tiny job: 48 training records, 6 queries, a 1-layer GPT-2, 3 optimizer steps."""
    cfg = {
        "root": str(tmp_path / "runs"),
        "model": {"tokenizer": str(DATA / "tokenizer.json"),
                  "arch_config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}},
        "data": {"train": str(DATA / "instructions.jsonl"), "queries": str(DATA / "queries.jsonl"),
                 "limit_train": 48, "limit_queries": 6, "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-3},
        "schedule": {"steps": [2], "at_end": True, "batch_size": 16},
        "projection": {"rank_in": 4, "rank_out": 4},
        "analysis": {"top_k": 3},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_run_influence_extract_inspect(tmp_path, job_config):
    done = logix_cli("run", str(job_config), "--project", "p", "--quiet", "--show", "2")
    assert done.returncode == 0, done.stderr
    assert "query q-arithmetic-0" in done.stdout and "sanity:" in done.stdout
    project = tmp_path / "runs" / "p"
    index = json.loads((project / "checkpoints.json").read_text())["checkpoints"]
    assert [c["name"] for c in index] == ["step-2", "final"] and [c["step"] for c in index] == [2, 3]
    records = [json.loads(line) for line in (project / "influence.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["proponents"]) == 3 for r in records)
    assert records[0]["query_text"].startswith("### Instruction:")
    assert all(p["text"] for r in records for p in r["proponents"])
    with open(project / "self_influence.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "self_influence"] and len(rows) == 49
    assert (project / "environment.json").exists() and (project / "final" / "config.yaml").exists()

    # influence again, other settings, into another folder: same queries, identity scores
    out = tmp_path / "scores"
    done = logix_cli("influence", str(project), "--preconditioner", "identity", "--top-k", "4",
                     "--save-scores", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "scored 6 queries x 48 train rows (identity" in done.stdout
    assert (out / "scores.h5").exists() and len((out / "influence.jsonl").read_text().splitlines()) == 6

    # the resolved job.yaml replays from any folder
    done = logix_cli("run", str(project / "job.yaml"), "--project", "replay", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    replay = [json.loads(line) for line in (tmp_path / "runs" / "replay" / "influence.jsonl").open()]
    assert [r["proponents"] for r in replay] == [r["proponents"] for r in records]

    done = logix_cli("extract", str(job_config), "--project", "ext", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "store 'train': 48 rows" in done.stdout and "store 'queries': 6 rows" in done.stdout

    done = logix_cli("inspect", str(project))
    assert done.returncode == 0 and "2 logged checkpoint(s)" in done.stdout


def test_cli_errors_exit_nonzero_with_one_line(tmp_path, job_config):
    done = logix_cli("run", str(job_config), "data.limt_train=3")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("logix: error:")
    assert "Unknown key 'data.limt_train'" in done.stderr and "Did you mean 'limit_train'" in done.stderr
    done = logix_cli("influence", str(tmp_path / "missing"))
    assert done.returncode == 1 and "is not a directory" in done.stderr
    done = logix_cli("run", str(tmp_path / "nope.yaml"))
    assert done.returncode == 1 and "Config file not found" in done.stderr
    done = logix_cli("run", str(job_config), "train.lr=-1")
    assert done.returncode == 1 and "train.lr must be a positive number" in done.stderr
    assert logix_cli("frobnicate").returncode == 2


def test_inspect_run_and_store(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    run = logix.init("cli", config={"projection": {"rank_in": 2, "rank_out": 3}}, root=tmp_path)
    run.watch(model)
    with run(data_id=["x", "y", "z"]):
        model(torch.randn(3, 3)).sum().backward()
    run.finalize()
    assert main(["inspect", str(run.dir)]) == 0
    out = capsys.readouterr().out
    # the defaults: int8 rows (10 bytes + one float32 scale per module each), EK-FAC statistics
    assert "store 'train': 3 rows in 1 shards, dtype int8, 10 values per row, 54.0 B" in out
    # ranks are capped at each module's size: (3, 2) for Linear(3, 4), (2, 2) for Linear(4, 2)
    assert "ids: x, y, z" in out and "(3, 2)" in out and "(2, 2)" in out and "finalized: True" in out
    assert "statistics ['A', 'A_evals', 'A_evecs', 'S', 'S_evals', 'S_evecs', 'ekfac', 'examples', 'tokens'] " \
           "for 2 modules" in out
    assert main(["inspect", str(run.dir / "stores" / "train")]) == 0


def test_inspect_bad_directory_exits_nonzero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("logix: error:") and "is not a logix run, project or store directory" in err


def test_cli_docs_are_in_sync():
    from logix.cli import cli_reference

    text = (ROOT / "docs" / "cli.md").read_text()
    assert cli_reference().strip() in text, "regenerate docs/cli.md (see its Reference section)"


def test_version_help_without_torch_and_malformed_yaml_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = functools.partial(subprocess.run, capture_output=True, text=True, env=env, cwd=ROOT)
    version = run([sys.executable, "-m", "logix.cli", "--version"])
    assert version.returncode == 0 and version.stdout.startswith("logix ")
    probe = run([sys.executable, "-c", "import sys, logix.cli; logix.cli.parser.build_parser().format_help(); "
                 "print('torch' in sys.modules)"])
    assert probe.stdout.strip() == "False", probe.stderr  # --help imports no torch (lazy library imports)
    bad = tmp_path / "bad.yaml"
    bad.write_text("statistics:\n  kfac: [true\n")
    proc = run([sys.executable, "-m", "logix.cli", "run", str(bad)])
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "is not valid YAML (line 3, column 1)" in proc.stderr and "Traceback" not in proc.stderr

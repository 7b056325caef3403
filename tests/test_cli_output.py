"""Command-line conventions: ``--json`` output on stdout with messages on stderr, training logs
kept off stdout, progress without escape sequences in a pipe, and help text for every option."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from logix.cli import main
from logix.cli.parser import build_parser
from logix.jobs.attribution import AttributionJob

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"


def tiny_config(tmp_path: Path, **train) -> dict:
    """48 training records, 6 queries, a 1-layer GPT-2, 3 optimizer steps (a log dict at step 2)."""
    return {
        "root": str(tmp_path / "runs"),
        "model": {"tokenizer": str(DATA / "tokenizer.json"),
                  "arch_config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}},
        "data": {"train": str(DATA / "instructions.jsonl"), "queries": str(DATA / "queries.jsonl"),
                 "limit_train": 48, "limit_queries": 6, "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-3, **train},
        "schedule": {"steps": [2], "at_end": True, "batch_size": 16},
        "projection": {"rank_in": 4, "rank_out": 4},
        "analysis": {"top_k": 3},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("json")
    AttributionJob(tiny_config(tmp_path), project="p", progress=False).run()
    return tmp_path / "runs" / "p"


def test_influence_json_lines_on_stdout_messages_on_stderr(project, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["influence", str(project), "--json", "--top-k", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]  # every stdout line is JSON
    assert [r["query_id"] for r in records] == [f"q-arithmetic-{i}" for i in range(6)]
    for r in records:
        assert [len(r["proponents"]), len(r["opponents"])] == [2, 2]
        assert r["proponents"][0]["score"] >= r["proponents"][1]["score"] > r["opponents"][0]["score"]
        assert r["query_text"].startswith("### Instruction:") and r["proponents"][0]["text"]
    assert records == [json.loads(line) for line in (out / "influence.jsonl").read_text().splitlines()]
    assert "scored 6 queries x 48 train rows" in captured.err and "sanity:" in captured.err
    # without --json the summary is the output
    assert main(["influence", str(project), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("scored 6 queries") and captured.err == ""


def test_inspect_json_is_one_object(project, capsys):
    assert main(["inspect", str(project), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["kind"] == "project" and described["status"] == "logged"
    assert [c["name"] for c in described["checkpoints"]] == ["step-2", "final"]
    assert [c["step"] for c in described["checkpoints"]] == [2, 3]
    assert "influence.jsonl" in described["outputs"]
    run = described["last_checkpoint"]
    assert run["kind"] == "run" and run["finalized"] is True and run["passes"] == ["log"]
    train = next(s for s in run["row_stores"] if s["name"] == "train")
    assert train["rows"] == 48 and train["dtype"] == "int8" and train["first_ids"][0] == "capitals-00314"
    assert {"name": "lm_head", "kind": "linear", "shape": [4, 4]} in train["modules"]
    assert train["dim"] == 4 * 4 * len(train["modules"])
    assert {"A", "S", "ekfac"} <= set(run["statistics"]["keys"])  # EK-FAC by default
    # a single store, and the text form still reads the same data
    assert main(["inspect", str(Path(train["path"])), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == train
    assert main(["inspect", str(project)]) == 0
    assert "2 logged checkpoint(s)" in capsys.readouterr().out


def test_quiet_run_prints_no_training_logs(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, batch_size=2)))  # a log dict every 2 steps
    assert main(["run", str(path), "--project", "q", "--quiet", "--show", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("logix job:")
    for text in (captured.out, captured.err):
        assert "'loss'" not in text and "train_runtime" not in text and "train step" not in text


def test_run_in_a_pipe_writes_plain_progress_lines_and_logs_to_stderr(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, batch_size=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "logix.cli", "run", str(path), "--project", "p"],
                          capture_output=True, text=True, timeout=300, env=env)  # stdout, stderr: pipes
    assert done.returncode == 0, done.stderr
    # nested bars (the Trainer's and each logging pass's) write no cursor movement into the log
    assert "\x1b[" not in done.stderr and "\r" not in done.stderr
    assert re.search(r"^logix pass 1/1: log: 3/3 batch \(100%\), done after", done.stderr, re.M), done.stderr
    assert re.search(r"^train: 3/3 step \(100%\), done after", done.stderr, re.M)
    assert re.search(r"^influence: 48/48 row \(100%\)", done.stderr, re.M)
    # the Trainer's log dicts are progress: on stderr, never mixed into the results on stdout
    assert re.search(r"^train step 2/3: loss \d", done.stderr, re.M)
    assert "loss" not in done.stdout and "train_runtime" not in done.stdout
    assert done.stdout.startswith("logix job:")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def entries_without_help(help_text: str) -> list[str]:
    """The entries of a ``--help`` text's argument lists with no help beside them or below them."""
    body = help_text.split("arguments:\n", 1)[-1] if "arguments:" in help_text else help_text.split("options:\n", 1)[1]
    lines = [line for line in body.splitlines() if line.strip() and not line.endswith(":")]
    missing = []
    for i, line in enumerate(lines):
        if not re.match(r"  \S", line):
            continue  # a continuation of the previous entry's help
        beside = len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 2
        below = i + 1 < len(lines) and re.match(r" {4,}\S", lines[i + 1])
        if not (beside or below):
            missing.append(line.strip())
    return missing


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = _subcommands()[name]
    assert entries_without_help(parser.format_help()) == [], f"logix {name} --help"
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help, f"logix {name}: {action.dest} has no help text"
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            assert "(default:" in formatter._get_help_string(action), f"logix {name}: {action.dest}"


def test_the_help_check_finds_an_option_without_help():
    parser = argparse.ArgumentParser(prog="x", formatter_class=_subcommands()["run"].formatter_class)
    parser.add_argument("--bare")
    parser.add_argument("--seed", type=int, default=0, help="a seed")
    parser.add_argument("--a-very-long-option-name-here", metavar="VALUE")
    assert entries_without_help(parser.format_help()) == ["--bare BARE", "--a-very-long-option-name-here VALUE"]
    assert "a seed (default: 0)" in parser.format_help()

"""Hostile or careless input is refused before anything is touched: project names that leave
root, overwrite of directories logix did not make, non-finite values, ids that do not match the
batch, bad option values; result files are never left half-written or stale."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from torch import nn

import logix
from logix.analysis import Damping, influence
from logix.cli import main
from logix.errors import BatchError, ConfigError, RunDirectoryError, StatisticsError
from logix.jobs.attribution import AttributionJob
from logix.store.rundir import influence_file, run_file, scores_file, store_dir
from tests.reliability.conftest import CONFIG, data, log_run, model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["..", ".", "../other", "a/b", "/tmp/abs", "", "a\\b"])
def test_project_names_that_leave_root_are_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    keep = tmp_path / "precious.txt"
    keep.write_text("not logix's")
    with pytest.raises(ConfigError, match="plain name|non-empty"):
        logix.init(name, root=root, overwrite=True)
    with pytest.raises(ConfigError, match="plain name|non-empty"):
        AttributionJob(REPO / "configs" / "quickstart.yaml", project=name, overwrite=True)
    assert keep.read_text() == "not logix's" and root.exists()


def test_cli_project_dotdot_with_overwrite_deletes_nothing(tmp_path, capsys):
    keep = tmp_path / "precious.txt"
    keep.write_text("x")
    code = main(["run", str(REPO / "configs" / "quickstart.yaml"), f"root={tmp_path / 'root'}", "--project", "..",
                 "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "not a plain name" in err
    assert keep.exists()


def test_overwrite_removes_only_a_logix_directory(tmp_path):
    root = tmp_path / "root"
    foreign = root / "mine"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(RunDirectoryError, match="holds no logix run"):
        logix.init("mine", root=root, overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]  # untouched: not even a lock file added
    with pytest.raises(RunDirectoryError, match="holds no logix run"):
        logix.init("mine", root=root, overwrite=True)  # and so refused again
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "run.json").write_text("{}")  # looks like a run, but lies outside root
    (root / "link").symlink_to(outside)
    with pytest.raises(RunDirectoryError, match="not a directory inside root"):
        logix.init("link", root=root, overwrite=True)
    assert (outside / "run.json").exists()
    run_dir = log_run(root, "real")
    assert logix.load_store(store_dir(run_dir)).n_rows == 32
    logix.init("real", config=CONFIG, root=root, overwrite=True)  # a logix run: deleted, started anew
    assert not store_dir(run_dir).exists() and run_file(run_dir).exists()


def _nan_run(tmp_path, nonfinite: str):
    net = model()
    x, y = data(12, 1)
    x[5, 0] = float("nan")  # example ex5 (batch 4..7) has a NaN input: NaN loss, NaN gradient
    run = logix.init("nan", config={**CONFIG, "statistics": {"kfac": False, "ekfac": False},
                                    "capture": {"nonfinite": nonfinite}}, root=tmp_path)
    run.watch(net)
    errors = []
    for lo in range(0, 12, 4):
        try:
            with run(data_id=[f"ex{i}" for i in range(lo, lo + 4)]):
                nn.functional.cross_entropy(net(x[lo : lo + 4]), y[lo : lo + 4], reduction="sum").backward()
        except BatchError as exc:
            errors.append(str(exc))
    run.finalize()
    return run, errors


def test_a_nan_batch_is_refused_naming_its_ids_and_nothing_is_lost(tmp_path):
    run, errors = _nan_run(tmp_path, "error")
    assert len(errors) == 1 and "['ex5']" in errors[0] and "capture.nonfinite: skip" in errors[0]
    store = run.store()
    assert sorted(store.ids) == sorted(f"ex{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11))  # the batch is not kept
    assert torch.isfinite(store.read_all()).all()


def test_skip_drops_only_the_nonfinite_examples_and_records_them(tmp_path):
    run, errors = _nan_run(tmp_path, "skip")
    assert not errors
    store = run.store()
    assert "ex5" not in store.ids and len(store.ids) == 11 and torch.isfinite(store.read_all()).all()
    recorded = json.loads(run_file(run.dir).read_text())
    assert recorded["skipped_nonfinite"] == {"train": ["ex5"]} and recorded["nonfinite_batches"] == {"log": 1}


def test_rows_that_overflow_float16_are_refused(tmp_path):
    net = model()
    x, y = data(4, 1)
    run = logix.init("f16", config={**CONFIG, "statistics": {"kfac": False, "ekfac": False}, "store": {"dtype": "float16"}},
                     root=tmp_path)
    run.watch(net)
    with pytest.raises(BatchError, match="store.dtype float16"):
        with run(data_id=[0, 1, 2, 3]):
            (net(x * 1e5) ** 2).sum().mul(1e6).backward()


def test_damping_must_be_finite(run_dir):
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite number >= 0"):
            influence(run_dir, damping=bad, progress=False)


def test_relative_damping_of_a_module_with_all_zero_gradients_is_refused(tmp_path):
    """A module whose gradients are all zero (e.g. LoRA's A while B is zero) has an all-zero
    spectrum: a relative damping is zero and used to divide 0 by 0 into NaN scores."""
    net = model()
    x, y = data(8, 1)
    run = logix.init("zero", config=CONFIG, root=tmp_path)
    run.watch(net)
    for _ in run.plan():
        with run(data_id=list(range(8))):
            nn.functional.cross_entropy(net[2](net[1](net[0](x)) * 0.0), y, reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=["q"]):
        nn.functional.cross_entropy(net(x[:1]), y[:1], reduction="sum").backward()
    run.finalize()
    with pytest.raises(StatisticsError, match="all-zero curvature spectrum.*relative=False"):
        influence(run.dir, preconditioner="kfac", progress=False)
    result = influence(run.dir, preconditioner="kfac", damping=Damping(1e-3, relative=False), progress=False)
    assert torch.isfinite(result.top_scores).all() and torch.isfinite(result.self_influence).all()


@pytest.mark.parametrize("n_ids", [3, 2])
def test_ids_that_do_not_match_the_batch_are_refused(tmp_path, n_ids):
    net = model()
    x, y = data(1, 1)
    run = logix.init("ids", config={**CONFIG, "statistics": {"kfac": False, "ekfac": False}}, root=tmp_path)
    run.watch(net)
    with pytest.raises(BatchError, match=f"data_id has {n_ids} ids"):
        with run(data_id=list(range(n_ids))):
            nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    run.finalize()
    assert run.store().n_rows == 0


def test_scores_are_never_left_half_written(run_dir, tmp_path, monkeypatch):
    path = tmp_path / "scores.h5"
    influence(run_dir, top_k=3, scores_path=path, progress=False)
    before = h5py.File(path, "r")["scores"][()]
    scoring = sys.modules["logix.analysis.influence"]
    calls = {"n": 0}
    real = scoring._stream

    def dies_midway(*args, **kwargs):
        calls["n"] += 1
        real(*args, **kwargs)
        raise KeyboardInterrupt  # as a kill would, after some blocks were written

    monkeypatch.setattr(scoring, "_stream", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        influence(run_dir, top_k=3, scores_path=path, progress=False, damping=0.5)
    assert calls["n"] == 1
    with h5py.File(path, "r") as fh:  # the earlier matrix, whole; no temporary left behind
        assert (fh["scores"][()] == before).all()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sigkill_while_scoring_leaves_no_file_at_the_final_path(run_dir, tmp_path):
    path = tmp_path / "killed.h5"
    code = ("import sys, time, logix.store.scores as s\n"
            "orig = s.ScoreMatrixWriter.write\n"
            "def slow(self, *a):\n    orig(self, *a); print('wrote', flush=True); time.sleep(60)\n"
            "s.ScoreMatrixWriter.write = slow\n"
            "from logix.analysis import influence\n"
            "influence(sys.argv[1], top_k=3, scores_path=sys.argv[2], progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(path)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "wrote"
    proc.kill()
    proc.wait()
    assert not path.exists()  # only a hidden temporary, never a corrupt file at the final path


def test_a_rerun_without_save_scores_removes_the_stale_matrix(run_dir, capsys):
    assert main(["influence", str(run_dir), "--save-scores", "--quiet"]) == 0
    assert scores_file(run_dir).exists()
    assert main(["influence", str(run_dir), "--quiet", "--damping", "0.5"]) == 0
    assert not scores_file(run_dir).exists() and influence_file(run_dir).exists()


@pytest.mark.parametrize("args", [["--top-k", "-3"], ["--top-k", "zero"], ["--damping", "nan"],
                                  ["--damping", "-1"], ["--part-rows", "0"]])
def test_bad_option_values_are_one_line_and_exit_2(run_dir, args):
    proc = subprocess.run([sys.executable, "-m", "logix.cli", "influence", str(run_dir), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and args[0] in proc.stderr


def test_nan_scores_never_reach_influence_jsonl(run_dir, tmp_path):
    from logix.analysis.influence import InfluenceResult
    from logix.analysis.records import write_outputs
    from logix.errors import StatisticsError

    result = influence(run_dir, top_k=2, progress=False)
    bad = InfluenceResult(result.query_ids, result.train_ids, result.top_ids,
                          result.top_scores * math.nan, result.bottom_ids, result.bottom_scores, None)
    with pytest.raises(StatisticsError, match="NaN or Inf"):
        write_outputs(tmp_path, bad, {}, {}, None)
    assert not influence_file(tmp_path).exists()


def test_scoring_before_the_queries_are_committed_says_to_finalize(tmp_path):
    net = model()
    x, y = data(8, 1)
    run = logix.init("nf", config=CONFIG, root=tmp_path)
    run.watch(net)
    for _ in run.plan():
        for lo in range(0, 8, 4):
            with run(data_id=list(range(lo, lo + 4))):
                nn.functional.cross_entropy(net(x[lo : lo + 4]), y[lo : lo + 4], reduction="sum").backward()
    run.finalize()
    with pytest.raises(StatisticsError, match="no logged queries"):
        influence(run.dir, progress=False)
    with run.log_queries(data_id=["q0", "q1"]):
        nn.functional.cross_entropy(net(x[:2]), y[:2], reduction="sum").backward()
    with pytest.raises(StatisticsError, match=r"no committed query rows: call run.finalize\(\) after"):
        influence(run.dir, progress=False)  # the second finalize() was forgotten
    run.finalize()
    assert len(influence(run.dir, progress=False, top_k=3).query_ids) == 2

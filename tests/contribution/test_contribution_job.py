"""`logix contribute` and `logix select` end to end on a tiny model and a slice of the shipped pool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from logix.config import Config
from logix.contribution import ScoreTable, load_pool, select
from logix.errors import ConfigError
from logix.jobs.contribution import ContributionJob

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"


def _pool(tmp_path: Path, n: int = 60) -> Path:
    lines = (DATA / "instructions.jsonl").read_text().splitlines()[:n]
    path = tmp_path / "pool.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(tmp_path: Path, **contribution) -> dict:
    return {
        "root": str(tmp_path / "runs"),
        "model": {"tokenizer": str(DATA / "tokenizer.json"),
                  "arch_config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 128}},
        "data": {"train": str(_pool(tmp_path)), "max_length": 48, "category_field": "category"},
        "contribution": {"methods": ["icl", "ifd"], "sample_size": 24, "assessment_size": 6, "batch_size": 8,
                         "top_k": 5, **contribution},
    }


@pytest.mark.slow
def test_contribute_job_scores_selects_and_resumes(tmp_path):
    cfg = _config(tmp_path)
    result = ContributionJob(Config.from_dict(cfg), progress=False).run()
    table = result.table
    pool = load_pool(tmp_path / "pool.jsonl")
    assert len(table) == 60 - 6  # probes drawn from the pool are not candidates
    for name in ("icl", "ifd"):
        assert (~np.isnan(table.column(name))).sum() <= 24  # the sample only (ifd may drop >= 1)
    assert (~np.isnan(table.column("icl"))).sum() == 24
    assert not np.isnan(table.column("selector")).any()  # the selector scores every candidate
    assert {"length", "random", "icl_share_positive", "icl_sigmoid"} <= set(table.names)
    # the selection is the top 5 by the selector's prediction, exported as the records were read
    expected = select(table, "selector", top_k=5).ids
    lines = result.paths["subset"].read_text().splitlines()
    by_id = {r["id"]: r for r in pool.records}
    assert [json.loads(line) for line in lines] == [by_id[i] for i in expected]
    summary = json.loads(result.paths["summary"].read_text())
    assert summary["selector"]["trained_on"] == "icl" and summary["selector"]["n_holdout"] >= 2
    assert {"length", "random", "icl", "ifd"} <= set(summary["agreement"])
    assert "selector (ridge)" in result.summary()
    # re-running resumes from the logs and reproduces the scores
    again = ContributionJob(Config.from_dict(cfg), progress=False).run()
    np.testing.assert_array_equal(again.table.column("icl"), table.column("icl"))
    # `logix inspect` describes a contribution project: scores per method and the selection
    from logix.jobs.inspect import inspect_run

    text = inspect_run(result.dir)
    assert f"{len(table)} examples scored" in text and "selected 5 of" in text
    assert all(name in text for name in ("icl", "ifd", "selector", "length"))


def test_contribute_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'lesss'. Did you mean 'less'"):
        Config.from_dict({"contribution": {"methods": ["lesss"]}})
    with pytest.raises(ConfigError, match="Unknown value for contribution.selector"):
        Config.from_dict({"contribution": {"selector": "svm"}})
    cfg = _config(tmp_path, select_by="less")
    with pytest.raises(ConfigError, match="select_by='less' is not computed"):
        ContributionJob(Config.from_dict(cfg), progress=False).run()


def test_select_cli_writes_the_subset_and_summary(tmp_path):
    pool_path = _pool(tmp_path, 30)
    pool = load_pool(pool_path)
    rng = np.random.default_rng(0)
    ScoreTable(pool.ids, {"icl": rng.normal(size=30)}).save(tmp_path / "scores.csv")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "logix.cli", "select", "--scores", str(tmp_path / "scores.csv"),
                           "--pool", str(pool_path), "--by", "icl", "--top-p", "0.2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "vs random" in proc.stdout and "vs length" in proc.stdout
    table = ScoreTable.load(tmp_path / "scores.csv")
    expected = select(table, "icl", top_p=0.2).ids
    assert [json.loads(x)["id"] for x in (out / "selected.jsonl").read_text().splitlines()] == expected
    assert json.loads((out / "summary.json").read_text())["selected"] == 6
    bad = subprocess.run([sys.executable, "-m", "logix.cli", "select", "--scores", str(tmp_path / "scores.csv"),
                          "--pool", str(pool_path), "--by", "ifd", "--top-k", "3", "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "no score named 'ifd'" in bad.stderr and not (tmp_path / "o2").exists()


def test_contribution_config_round_trips(tmp_path):
    cfg = Config.from_dict(_config(tmp_path))
    again = Config.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.contribution == cfg.contribution


@pytest.mark.slow
def test_contribute_job_with_less_scores_every_candidate(tmp_path):
    from logix.contribution import less_scores

    cfg = _config(tmp_path, methods=["less"], less_epochs=2, less_fraction=0.2)
    result = ContributionJob(Config.from_dict(cfg), progress=False).run()
    less = result.table.column("less")
    assert not np.isnan(less).any() and len(less) == 54
    # the job's column is what less_scores computes from the logs it left
    direct = less_scores(result.dir / "less", progress=False)
    where = {i: k for k, i in enumerate(result.table.ids)}
    np.testing.assert_allclose([less[where[i]] for i in direct.train_ids], direct.scores.double().numpy())
    assert result.selection.by == "less" and len(result.selection.ids) == 5

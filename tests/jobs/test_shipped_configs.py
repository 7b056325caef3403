"""Every config in configs/ runs as shipped through the command line (offline, on a slice of the
shipped data), logs what it says it logs, and works as a logger config of ``logix.init``.

The configs are collected from the directory: a new config is run here without being listed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import logix
from logix.capture.passes import plan_specs
from logix.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA = ROOT / "examples" / "data"

# A few seconds per config: 32 training records (2 optimizer steps), 6 queries.
RUN_OVERRIDES = ["data.limit_train=32", "data.limit_queries=6", "train.epochs=1", "schedule.batch_size=16"]


def command_of(path: Path) -> str:
    """``contribute`` for a config with a contribution section, else ``run``."""
    return "contribute" if "contribution" in yaml.safe_load(path.read_text()) else "run"


def test_configs_are_collected():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "logix.yaml", "ekfac_pca.yaml", "full_gradients.yaml", "lm_influence.yaml",
            "contribution.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs_from_the_command_line(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative data paths resolve from the config's folder, not the cwd
    if command_of(path) == "contribute":
        pool = tmp_path / "pool.jsonl"  # a slice of the shipped pool, as the contribution job tests use
        pool.write_text("".join((DATA / "instructions.jsonl").open().readlines()[:120]))
        argv = ["contribute", str(path), f"root={tmp_path}", f"data.train={pool}", "contribution.sample_size=24",
                "contribution.assessment_size=6", "--project", "c", "--quiet"]
        assert main(argv) == 0, capsys.readouterr().err
        assert main(["inspect", str(tmp_path / "c"), "--json"]) == 0
        described = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert described["kind"] == "contribution" and described["examples"] == 120 - 6
        assert described["selection"]["selected"] >= 1
        return

    argv = ["run", str(path), f"root={tmp_path}", *RUN_OVERRIDES, "--project", "p", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "query q-arithmetic-0" in out, out
    project = tmp_path / "p"
    records = [json.loads(line) for line in (project / "influence.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["proponents"] and r["opponents"] for r in records)

    # the run logged what the config is about: its projection, passes, statistics and row dtype
    config = logix.Config.from_yaml(path)
    assert main(["inspect", str(project), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["last_checkpoint"]
    assert run["projection"] == config.projection.type.value
    assert run["passes"] == [spec.name.value for spec in plan_specs(config)]
    train = next(s for s in run["row_stores"] if s["name"] == "train")
    assert train["rows"] == 32 and train["dtype"] == config.store.dtype.value
    keys = set(run["statistics"]["keys"])
    assert ("ekfac" in keys) == config.statistics.ekfac and ("raw" in keys) == config.statistics.raw


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_a_logger_config_of_logix_init(path, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    run = logix.init(path.stem, config=path, root=tmp_path)
    run.watch(model)
    for _ in run.plan():
        with run(data_id=["a", "b", "c", "d"]):
            model(torch.randn(4, 6)).pow(2).sum().backward()
        model.zero_grad(set_to_none=True)
    store = run.finalize()
    assert store.n_rows == 4 and store.modules == ["0", "2"]
    assert run.dir == tmp_path / path.stem  # the root argument wins over the config's

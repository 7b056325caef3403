"""Strict types for any value (hypothesis), ids stored exactly as given, the documented
``fisher: true`` scoreable, and ``logix inspect`` on an interrupted extract project."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import logix
from logix.analysis import influence
from logix.cli import main
from logix.config import Config, FisherType
from logix.errors import ConfigError
from logix.store import Layout, ShardWriter, Store
from logix.store.rundir import checkpoints_file, job_file, model_run_dir
from tests.reliability.conftest import CONFIG, data, log_run, model

BOOL_FIELDS = [("statistics", "kfac"), ("statistics", "ekfac"), ("statistics", "raw"), ("capture", "per_token"),
               ("analysis", "save_scores")]
NOT_BOOLS = st.one_of(st.text(max_size=8), st.integers(), st.floats(allow_nan=True), st.none(),
                      st.lists(st.booleans(), max_size=2))


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(BOOL_FIELDS), value=NOT_BOOLS)
def test_a_bool_field_takes_only_a_bool(field, value):
    section, key = field
    with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
        Config.from_dict({section: {key: value}}) if hasattr(Config, "from_dict") else logix.config.resolve_config(
            {section: {key: value}})


@settings(max_examples=40, deadline=None)
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not v >= 0),
                       st.text(max_size=5), st.booleans()))
def test_damping_is_a_finite_nonnegative_number(value):
    with pytest.raises(ConfigError, match="analysis.damping"):
        logix.config.resolve_config({"analysis": {"damping": value}})


@pytest.mark.parametrize("yaml_value, expected", [("true", FisherType.TRUE), ("false", FisherType.EMPIRICAL),
                                                  ("expected", FisherType.EXPECTED), ("'true'", FisherType.TRUE)])
def test_fisher_as_the_docs_write_it(tmp_path, yaml_value, expected):
    path = tmp_path / "c.yaml"
    extra = "\n  fisher_classes: 3" if expected is FisherType.EXPECTED else ""
    path.write_text(f"statistics:\n  kfac: true\n  fisher: {yaml_value}{extra}\n")
    assert Config.from_yaml(path).statistics.fisher is expected


def test_a_true_fisher_kfac_run_can_be_scored(tmp_path):
    net = model()
    x, y = data(16, 1)
    run = logix.init("tf", config={**CONFIG, "statistics": {"kfac": True, "fisher": True}}, root=tmp_path)
    run.watch(net)
    for p in run.plan():
        for lo in range(0, 16, 4):
            with run(data_id=[f"ex{i}" for i in range(lo, lo + 4)]):
                out = net(x[lo : lo + 4])
                labels = torch.distributions.Categorical(logits=out.detach()).sample() if p.sample_labels \
                    else y[lo : lo + 4]
                nn.functional.cross_entropy(out, labels, reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=["q"]):
        nn.functional.cross_entropy(net(x[:1]), y[:1], reduction="sum").backward()
    run.finalize()
    result = influence(run.dir, top_k=3, progress=False)
    assert torch.isfinite(result.top_scores).all() and len(result.train_ids) == 16


IDS = st.one_of(st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=30, unique=True),
                st.lists(st.text(min_size=1, max_size=12).filter(lambda t: "\x00" not in t), min_size=1,
                         max_size=30, unique=True))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=IDS)
def test_ids_come_back_exactly_as_written(tmp_path_factory, ids):
    directory = tmp_path_factory.mktemp("ids")
    layout = Layout.build([("m", "linear", (2, 2))])
    writer = ShardWriter(directory, layout, "float32", False)
    writer.set_id_type("int" if isinstance(ids[0], int) else "str")
    rows = torch.arange(len(ids) * 4, dtype=torch.float32).reshape(len(ids), 4)
    half = len(ids) // 2
    writer.submit(rows[:half], ids[:half])
    writer.submit(rows[half:], ids[half:])
    writer.close()
    store = Store(directory)
    assert store.ids == ids
    torch.testing.assert_close(store.get(ids[::-1]), rows.flip(0), rtol=0, atol=0)
    assert store.verify() == []


def test_inspect_an_interrupted_extract_project(tmp_path, capsys):
    root = tmp_path / "root"
    run_dir = log_run(root / "proj", "model")
    assert run_dir == model_run_dir(root / "proj")
    shutil.copy(logix.__file__.replace("__init__.py", "") + "../configs/quickstart.yaml", job_file(root / "proj"))
    assert not checkpoints_file(root / "proj").exists()  # interrupted before its index was written
    assert main(["inspect", str(root / "proj")]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out and "store 'train': 32 rows" in out

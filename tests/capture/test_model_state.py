"""A plain loop never scores rows of one model state against another, and needs only two lines.

* A re-run of a script on an existing project with a *different* model state (trained longer,
  freshly initialised) is refused before it adds rows or queries, or before ``run.plan()``
  declares the run done; the same state resumes; ``resume=True`` / ``overwrite=True`` choose.
* Logging while training (weights move between blocks of one session) is allowed, and the
  state recorded is the last one, so queries logged later with the trained model are accepted.
* ``logix.init(model=)`` + ``with run(..., loss_reduction="mean")`` around the loop's own mean
  loss gives the rows of the per-example summed loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logix
from logix.errors import PlanError, RunDirectoryError

X, Y = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), torch.arange(12) % 3


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def log_train(run, model, lo: int = 0, hi: int = 12) -> None:
    for start in range(lo, hi, 4):
        with run(data_id=list(range(start, start + 4))):
            F.cross_entropy(model(X[start:start + 4]), Y[start:start + 4], reduction="sum").backward()
        model.zero_grad()


def log_queries(run, model) -> None:
    with run.log_queries(data_id=["q0", "q1"]):
        F.cross_entropy(model(X[:2]), Y[:2], reduction="sum").backward()
    model.zero_grad()
    run.finalize()


def trained_longer(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


def test_rerun_with_another_model_state_is_refused(tmp_path):
    model = net()
    run = logix.init("p", root=tmp_path, model=model)
    log_train(run, model)
    run.finalize()
    # the script re-run after training longer: plan() would yield nothing and reuse the old rows
    other = trained_longer(net())
    again = logix.init("p", root=tmp_path, model=other)
    with pytest.raises(RunDirectoryError, match="another state of the model.*overwrite=True.*resume=True"):
        again.plan()  # refused before it yields: its passes are done, with another model's rows
    # queries from a freshly initialised model against the trained model's rows
    new = net(seed=1)
    fresh = logix.init("p", root=tmp_path, model=new)
    with pytest.raises(RunDirectoryError, match="another state of the model"):
        log_queries(fresh, new)
    assert logix.load_run_store(tmp_path / "p").n_rows == 12  # nothing lost or changed
    # the same state resumes and logs its queries
    again_same = net()
    same = logix.init("p", root=tmp_path, model=again_same)
    log_queries(same, again_same)
    assert same.store("queries").n_rows == 2


def test_explicit_resume_or_overwrite(tmp_path):
    model = net()
    run = logix.init("p", root=tmp_path, model=model)
    log_train(run, model, 0, 8)
    run.close()  # interrupted after 8 rows
    other = trained_longer(net())
    with pytest.raises(RunDirectoryError):
        log_train(logix.init("p", root=tmp_path, model=other), other, 8, 12)
    resumed = logix.init("p", root=tmp_path, model=other, resume=True)
    log_train(resumed, other, 8, 12)
    assert resumed.finalize().n_rows == 12
    new = net(seed=3)
    fresh = logix.init("p", root=tmp_path, model=new, overwrite=True)
    log_train(fresh, new, 0, 4)
    assert fresh.finalize().n_rows == 4


def test_logging_while_training_then_queries_of_the_trained_model(tmp_path):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = logix.init("p", root=tmp_path, model=model)
    for start in range(0, 12, 4):  # the ordinary training loop, logged: weights move each step
        with run(data_id=list(range(start, start + 4))):
            F.cross_entropy(model(X[start:start + 4]), Y[start:start + 4], reduction="sum").backward()
        opt.step()
        opt.zero_grad()
    run.finalize()
    later = logix.init("p", root=tmp_path, model=model)  # a later session with the trained model
    log_queries(later, model)
    untrained = net()
    with pytest.raises(RunDirectoryError):
        log_queries(logix.init("p", root=tmp_path, model=untrained), untrained)


def test_mean_loss_of_the_loop_gives_the_summed_rows(tmp_path):
    model = net()
    summed = logix.init("sum", root=tmp_path, model=model)
    log_train(summed, model)
    mean = logix.init("mean", root=tmp_path, model=model)  # the two lines around the loop's own loss
    for start in range(0, 12, 4):
        with mean(data_id=list(range(start, start + 4)), loss_reduction="mean"):
            F.cross_entropy(model(X[start:start + 4]), Y[start:start + 4]).backward()
        model.zero_grad()
    ids = list(range(12))
    torch.testing.assert_close(mean.finalize().get(ids), summed.finalize().get(ids))
    torch.testing.assert_close(mean.statistics.mean("2", "S"), summed.statistics.mean("2", "S"))
    with pytest.raises(logix.LogixError, match="loss_scale must be a positive"):
        mean(data_id=[0], loss_scale=0.0)  # checked when the block is made


def test_hf_causal_lm_mean_loss_with_loss_scale(tmp_path):
    transformers = pytest.importorskip("transformers")
    from logix.integrations import summed_loss

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tokens = torch.randint(0, 40, (3, 10))
    labels = tokens.clone()
    labels[:, :3] = -100
    batch = {"input_ids": tokens, "labels": labels}
    ref = logix.init("ref", root=tmp_path, model=model)
    with ref(data_id=[0, 1, 2]):
        summed_loss(model, batch).backward()
    model.zero_grad()
    own = logix.init("own", root=tmp_path, model=model)
    with own(data_id=[0, 1, 2], loss_scale=(labels[:, 1:] != -100).sum()):
        model(**batch).loss.backward()  # the model's own mean over label tokens
    torch.testing.assert_close(own.finalize().get([0, 1, 2]), ref.finalize().get([0, 1, 2]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config, passes", [({}, ["log"]), ({"statistics": {"ekfac": True}}, ["log"]),
                                            ({"projection": {"type": "pca"}}, ["covariance", "log"])])
def test_loop_without_plan_for_one_pass_configs_only(tmp_path, config, passes):
    model = net()
    run = logix.init("p", root=tmp_path, config=config, model=model)
    assert run.passes == passes
    if passes == ["log"]:
        log_train(run, model)
        assert run.finalize().n_rows == 12
    else:
        with pytest.raises(PlanError, match=r"needs the passes \['covariance', 'log'\].*run.plan\(\)"):
            log_train(run, model)


def test_docs_table_of_passes_matches_every_shipped_config():
    """docs/quickstart.md says which shipped configs need run.plan(); it must stay true."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    table = (root / "docs" / "quickstart.md").read_text().split("**Which configurations need")[1].split("\n\n")[1]
    documented = {}
    for line in table.splitlines()[2:]:
        names, passes = line.split("|")[1:3]
        for name in re.findall(r"`([\w.]+\.yaml)`", names):
            documented[name] = re.findall(r"`(\w+)`", passes)
    from logix.capture.passes import plan_specs

    for path in sorted((root / "configs").glob("*.yaml")):
        passes = [spec.name.value for spec in plan_specs(logix.Config.from_yaml(path))]
        assert documented.get(path.name) == passes, f"docs/quickstart.md lists {path.name} wrongly (passes: {passes})"
    assert [s.name.value for s in plan_specs(logix.Config())] == ["log"]

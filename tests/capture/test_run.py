"""Run lifecycle: the model is untouched, hooks never leak, bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import logix
from logix.errors import (
    BatchError,
    CaptureError,
    ConfigError,
    DuplicateIdError,
    PlanError,
    RunDirectoryError,
    UnsupportedModuleError,
    WatchError,
)
from tests.helpers import lm_summed_loss, lm_token_batch, per_example_grads, rel_err, tiny_gpt2


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def test_outputs_and_parameter_grads_bit_identical(tmp_path):
    model = tiny_gpt2(dtype=torch.float32)
    tokens, mask, labels, _ = lm_token_batch(4, 12, 37)
    keys, flags = list(model.state_dict()), [p.requires_grad for p in model.parameters()]
    modules_before = [type(m) for m in model.modules()]

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, attention_mask=mask).logits
        nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, 37), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        ).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    step()  # warm-up: a process's first GEMMs of a shape may take another kernel path (last-bit differences)
    plain_out, plain_grads = step()
    for ekfac in (False, True):
        run = logix.init(f"bit{ekfac}", config={"statistics": {"ekfac": ekfac}}, root=tmp_path)
        run.watch(model)
        for _ in run.plan():
            with run(data_id=[0, 1, 2, 3], mask=mask):
                out, grads = step()
            assert torch.equal(out, plain_out)
            assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
        run.finalize()
    assert list(model.state_dict()) == keys
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [type(m) for m in model.modules()] == modules_before
    assert _hooks(model) == 0


def test_hooks_removed_on_exception_and_nothing_logged_is_lost(tmp_path):
    model = _mlp()
    x = torch.randn(8, 4)
    run = logix.init("exc", config={"store": {"shard_rows": 2}}, root=tmp_path)
    run.watch(model)
    with run(data_id=[0, 1]):
        model(x[:2]).sum().backward()
    with pytest.raises(RuntimeError, match="boom"):
        with run(data_id=[2, 3]):
            model(x[2:4]).sum().backward()
            raise RuntimeError("boom")
    assert _hooks(model) == 0
    with pytest.raises(BatchError, match="3 ids"):  # wrong id count: clear error, hooks removed
        with run(data_id=[4, 5, 6]):
            model(x[4:6]).sum().backward()
    assert _hooks(model) == 0
    with run(data_id=[2, 3]):  # the failed batch can be logged again
        model(x[2:4]).sum().backward()
    store = run.finalize()
    assert store.ids == [0, 1, 2, 3]


def test_watch_filters_and_errors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    run = logix.init("w", root=tmp_path)
    assert run.watch(model, modules=["2"]) == ["2"]
    assert run.watch(model, exclude=["0"]) == ["2"]
    assert run.watch(model, types=["linear"]) == ["0", "2"]
    with pytest.raises(WatchError, match="did not match"):
        run.watch(model, modules=["nope*"])
    with pytest.raises(UnsupportedModuleError, match="LayerNorm.*Supported types"):
        run.watch(model, modules=["1"])
    with pytest.raises(WatchError, match="Unknown module kinds"):
        run.watch(model, types=["lstm"])
    model.requires_grad_(False)
    with pytest.raises(WatchError, match="requires_grad=False"):
        run.watch(model)
    with pytest.raises(WatchError, match="no supported module"):
        run.watch(nn.Sequential(nn.ReLU()))
    with pytest.raises(UnsupportedModuleError, match="groups"):
        run.watch(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))


def test_mask_and_batch_errors(tmp_path):
    model = tiny_gpt2(dtype=torch.float32)
    tokens, mask, labels, _ = lm_token_batch(2, 8, 37)
    run = logix.init("m", root=tmp_path)
    run.watch(model)
    with pytest.raises(BatchError, match="mask has shape"):
        with run(data_id=[0, 1], mask=mask[:, :5]):
            lm_summed_loss(model, tokens, mask, labels).backward()
    with pytest.raises(BatchError, match="2 rows but data_id has 3"):
        with run(data_id=[0, 1, 2], mask=mask):
            pass
    with pytest.raises(BatchError, match="only 0 and 1"):
        with run(data_id=[0, 1], mask=mask * 2):
            pass
    with pytest.raises(BatchError, match="required"):
        with run(mask=mask):
            pass
    with pytest.raises(BatchError, match="only ints or only strings"):
        with run(data_id=[0, "a"]):
            pass
    with pytest.raises(CaptureError, match="backward"):
        with run(data_id=[0, 1], mask=mask):
            model(input_ids=tokens, attention_mask=mask)
    assert _hooks(model) == 0


def test_duplicate_ids_error_by_default_and_skip_policy(tmp_path):
    model, x = _mlp(), torch.randn(6, 4)
    run = logix.init("d", root=tmp_path)
    run.watch(model)
    with run(data_id=["a", "b"]):
        model(x[:2]).sum().backward()
    with pytest.raises(DuplicateIdError, match="'b'"):
        with run(data_id=["b", "c"]):
            model(x[2:4]).sum().backward()
    with pytest.raises(DuplicateIdError):
        with run(data_id=["c", "c"]):
            model(x[2:4]).sum().backward()
    assert run.finalize().ids == ["a", "b"]

    cfg = {"store": {"duplicate_ids": "skip", "dtype": "float32"}, "projection": {"type": "none"}}  # rows vs autograd
    run = logix.init("d2", config=cfg, root=tmp_path)
    run.watch(model)
    with run(data_id=["a", "b"]):
        model(x[:2]).sum().backward()
    with run(data_id=["b", "c"]):
        model(x[2:4]).sum().backward()
    store = run.finalize()
    assert store.ids == ["a", "b", "c"]
    single = _single_grads(model, x[[0, 1, 3]])
    assert rel_err(store.read_all().double(), single) < 1e-5  # "c" is x[3], the first "b" kept


def _single_grads(model, xs):
    grads = per_example_grads(model, ["0", "2"], len(xs), lambda i: model(xs[i : i + 1]).sum())
    return torch.cat([grads["0"].flatten(1), grads["2"].flatten(1)], 1).double()


def test_run_directory_reuse(tmp_path):
    model, x = _mlp(), torch.randn(4, 4)
    run = logix.init("r", config={"projection": {"rank_in": 4}}, root=tmp_path)
    run.watch(model)
    with run(data_id=[0, 1]):
        model(x[:2]).sum().backward()
    run.finalize()
    with pytest.raises(RunDirectoryError, match="rank_in: 4 -> 8"):
        logix.init("r", config={"projection": {"rank_in": 8}}, root=tmp_path)
    fresh = logix.init("r", config={"projection": {"rank_in": 8}}, root=tmp_path, overwrite=True)
    fresh.watch(model)
    with fresh(data_id=[0]):
        model(x[:1]).sum().backward()
    assert fresh.finalize().ids == [0]
    reopened = logix.init("r", config={"projection": {"rank_in": 8}}, root=tmp_path)
    reopened.watch(model)
    with pytest.raises(PlanError, match="finalized"):
        with reopened(data_id=[5]):
            pass
    with pytest.raises(WatchError, match="other modules"):
        reopened.watch(model, modules=["0"])


def test_plan_is_required_for_multi_pass_configs(tmp_path):
    model, x = _mlp(), torch.randn(4, 4)
    run = logix.init("p", config={"projection": {"type": "pca", "rank_in": 2, "rank_out": 2}}, root=tmp_path)
    run.watch(model)
    with pytest.raises(PlanError, match=r"\['covariance', 'log'\].*run.plan\(\)"):
        with run(data_id=[0, 1]):
            pass
    with pytest.raises(PlanError, match="before the passes"):
        run.finalize()
    seen = []
    for pass_ in run.plan():
        seen.append((pass_.name, pass_.writes_rows))
        with run(data_id=[0, 1, 2, 3]):
            model(x).sum().backward()
    assert seen == [("covariance", False), ("log", True)]
    assert run.finalize().n_rows == 4


def test_resume_in_process_skips_committed_ids(tmp_path):
    model, x = _mlp(), torch.randn(8, 4)
    cfg = {"store": {"shard_rows": 2}, "statistics": {"raw": True}}
    run = logix.init("res", config=cfg, root=tmp_path)
    run.watch(model)
    for lo in (0, 2):
        with run(data_id=[lo, lo + 1]):
            model(x[lo : lo + 2]).sum().backward()
    run.close()  # interrupted: committed, not finalized
    again = logix.init("res", config=cfg, root=tmp_path)
    again.watch(model)
    assert again.pending([0, 1, 2, 3, 4]) == [4]
    for lo in (0, 2, 4, 6):
        with again(data_id=[lo, lo + 1]) as ctx:
            model(x[lo : lo + 2]).sum().backward()
        assert ctx.skipped == (lo < 4)
    with again(data_id=[3, 8]):  # partly committed batch: only the new id is logged
        model(torch.cat([x[3:4], x[:1]])).sum().backward()
    store = again.finalize()
    assert store.ids == list(range(9))
    assert again.statistics.count("0", "examples") == 9


def test_per_token_rows_equal_token_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    cfg = {"capture": {"per_token": True, "compute_dtype": "float64"}, "projection": {"type": "none"},
           "statistics": {"ekfac": False}, "store": {"dtype": "float32"}}  # one pass; rows vs autograd
    run = logix.init("tok", config=cfg, root=tmp_path)
    run.watch(model)
    with run(data_id=["a", "b", "c"], mask=mask):
        (model(x) ** 2).sum().backward()
    store = run.finalize()
    assert store.per_token and store.n_rows == int(mask.sum())
    keys = [(i, int(p)) for i, p in zip(store.ids, store.positions)]
    assert keys[:3] == [("a", 0), ("a", 1), ("a", 2)]
    for name, b in [("a", 0), ("b", 1), ("c", 2)]:
        for t in range(int(mask[b].sum())):
            token = x[b, t : t + 1]
            oracle = per_example_grads(model, ["0", "2"], 1, lambda _, tok=token: (model(tok) ** 2).sum())
            row = store.get([(name, t)]).double()
            want = torch.cat([oracle["0"].flatten(1), oracle["2"].flatten(1)], 1)
            assert rel_err(row, want) < 1e-5


def test_config_strict_loading(tmp_path):
    with pytest.raises(ConfigError, match="Unknown key 'projection.rnk_in'.*Did you mean 'rank_in'"):
        logix.Config.from_dict({"projection": {"rnk_in": 3}})
    with pytest.raises(ConfigError, match="Choose between"):
        logix.Config.from_dict({"store": {"dtype": "int2"}})
    with pytest.raises(ConfigError) as info:  # every problem in one error
        logix.Config.from_dict({"projection": {"rank_in": -1}, "stor": {}})
    assert "rank_in" in str(info.value) and "Did you mean 'store'" in str(info.value)
    cfg = logix.Config.from_dict({"projection": {"ranks": {"*.c_fc": [8, 4]}}}, overrides=["projection.rank_in=16"])
    assert cfg.rank_for("h.0.mlp.c_fc") == (8, 4) and cfg.rank_for("lm_head") == (16, 32)  # rank_out: default
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    assert logix.Config.from_yaml(path) == cfg
    (tmp_path / "bad.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError"):
        logix.Config.from_yaml(tmp_path / "bad.yaml")


def test_per_module_ranks_saved_projections_and_no_statistics(tmp_path):
    model, x = _mlp(), torch.randn(5, 4)
    cfg = {
        "projection": {"rank_in": 2, "rank_out": 3, "ranks": {"2": [4, 1]}},
        "statistics": {"kfac": False, "ekfac": False},
    }
    run = logix.init("ranks", config=cfg, root=tmp_path)
    run.watch(model)
    with run(data_id=list(range(5))):
        model(x).sum().backward()
    store = run.finalize()
    assert [b.shape for b in store.layout.blocks] == [(3, 2), (1, 4)]
    assert run.projections["0"].p_in.shape == (5, 2) and run.projections["2"].p_out.shape == (3, 1)
    from safetensors.torch import load_file

    saved = load_file(str(run.dir / "projection.safetensors"))
    for name, proj in run.projections.items():
        assert torch.equal(saved[f"{name}::in"], proj.p_in) and torch.equal(saved[f"{name}::out"], proj.p_out)
    assert not run.statistics.has("0", "A") and run.statistics.count("0", "examples") == 5
    # the same seed gives the same projection in another process/run
    other = logix.init("ranks2", config=cfg, root=tmp_path)
    other.watch(model)
    assert torch.equal(other.projections["2"].p_in, run.projections["2"].p_in)

"""LESS from logix logs: Adam rows, moments by name, scores, and the callback's guarantees.

Oracles: per-example gradients by plain autograd on the trained model (one example at a time,
the LESS loss), the optimizer's own state read by position, the LESS formulas written out as
loops over checkpoints, tasks and validation examples.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from logix import Run
from logix.contribution.less import less_scores
from logix.contribution.less_moments import adam_transform, load_moments, optimizer_moments
from logix.contribution.less_rows import ADAM_STORES, log_adam_rows, module_moments, token_mean_loss
from logix.contribution.less_warmup import less_callback, less_extract, warmup_and_log
from logix.errors import ConfigError, LogixError, RunDirectoryError, StatisticsError
from logix.integrations.huggingface import LogixCallback
from logix.store import Store
from logix.store.rundir import MOMENTS_FILE
from tests.helpers import collate

hf_logging.set_verbosity_error()
VOCAB = 50
# rows compared with explicit Adam steps: unquantized rows; no curvature (LESS needs none)
CONFIG = {"projection": {"rank_in": 3, "rank_out": 2}, "statistics": {"kfac": False, "ekfac": False},
          "store": {"dtype": "float32"}, "schedule": {"steps": [2], "at_end": True, "batch_size": 5}}


def lora_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0)
    model = get_peft_model(GPT2LMHeadModel(cfg), lora)
    with torch.no_grad():  # LoRA B starts at 0 (A's gradient would be 0): give it a value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def dataset(n: int, seed: int = 0, prefix: str = "ex") -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        items.append({"id": f"{prefix}-{i}", "input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return items




def args(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
        learning_rate=5e-2, lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_steps=1,
        seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )


TRAIN, VAL = dataset(12), dataset(5, seed=1, prefix="val")


def train(tmp_path, steps=4, callback=None):
    trainer = Trainer(model=lora_model(), args=args(tmp_path, steps), train_dataset=TRAIN, data_collator=collate,
                      callbacks=[callback] if callback else [])
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A LoRA model trained 4 steps, logged after step 2 and at the end with Adam rows."""
    tmp = tmp_path_factory.mktemp("less")
    calls = []

    def counted_loss(model, batch, **kwargs):
        calls.append(len(batch["input_ids"]))
        return token_mean_loss(model, batch, **kwargs)

    callback = less_callback(CONFIG, project="p", root=tmp, queries=VAL, loss_fn=counted_loss,
                             adam_rows=True, progress=False)
    trainer = train(tmp, callback=callback)
    callback.loss_calls = calls
    return tmp / "p", trainer, callback


def test_adam_rows_ride_along_the_log_pass(logged):
    """One forward / backward per logged batch: 12 train examples in batches of 5 and one batch
    of 5 validation examples, at each of the 2 checkpoints (no second pass for the Adam rows)."""
    assert logged[2].loss_calls == [5, 5, 2, 5] * 2


def test_standalone_adam_rows_equal_the_fused_ones(tmp_path, logged):
    """log_adam_rows (a separate pass, what a resumed checkpoint uses) writes the same rows."""
    import shutil

    project, trainer, _ = logged
    copy = tmp_path / "final"
    shutil.copytree(project / "final", copy)
    shutil.rmtree(copy / "stores" / "train_adam")
    run = Run("final", config=CONFIG, root=tmp_path)
    run.watch(trainer.model)
    moments = load_moments(copy / MOMENTS_FILE)
    stores = log_adam_rows(run, trainer.model, TRAIN[::-1], collate, moments, batch_size=3, progress=False)
    assert set(stores) == {"paper", "code"}
    fused = Store(project / "final" / "stores" / "train_adam")
    again = stores["paper"]
    assert sorted(again.ids) == sorted(fused.ids)
    assert torch.allclose(again.get(fused.ids), fused.read_all(), rtol=1e-4, atol=1e-6)
    assert stores["code"].n_rows == len(TRAIN)  # the kept store was complete: nothing re-logged


def param_grads(model, item) -> dict[str, torch.Tensor]:
    """Gradient of one example's LESS loss (mean over its label tokens), by plain autograd."""
    model.eval()
    model.zero_grad(set_to_none=True)
    batch = collate([item])
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_token_mean_loss_is_the_sum_of_each_examples_mean_loss():
    model = lora_model()
    model.eval()
    items = TRAIN[:4]
    per_example = sum(model(**{k: v for k, v in collate([it]).items()}).loss for it in items)
    batch = collate(items)
    assert torch.allclose(token_mean_loss(model, batch), per_example, rtol=1e-5)


def test_moments_by_name_match_the_trainers_adamw_state(logged):
    project, trainer, _ = logged
    final = load_moments(project / "final" / MOMENTS_FILE)
    opt = trainer.optimizer
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    inner = getattr(opt, "optimizer", opt)
    seen = 0
    for group in inner.state_dict()["param_groups"]:
        for position in group["params"]:  # the optimizer's own state, keyed by position
            param = [p for g in inner.param_groups for p in g["params"]][position]
            state = inner.state_dict()["state"][position]
            name = names[id(param)]
            assert torch.equal(final.exp_avg[name], state["exp_avg"])
            assert torch.equal(final.exp_avg_sq[name], state["exp_avg_sq"])
            assert final.step[name] == float(state["step"]) == 4
            assert final.betas[name] == tuple(group["betas"]) and final.eps[name] == group["eps"]
            seen += 1
    assert seen == len(final.names) == sum(1 for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all("lora_" in n for n in final.names)
    early = load_moments(project / "step-2" / MOMENTS_FILE)
    assert {early.step[n] for n in early.names} == {2.0}
    assert not torch.equal(early.exp_avg[final.names[0]], final.exp_avg[final.names[0]])
    raw = load_file(str(project / "final" / MOMENTS_FILE))  # plain safetensors, keyed by name
    assert set(raw) == {f"{n}::{k}" for n in final.names for k in ("exp_avg", "exp_avg_sq")}


def expected_adam_row(model, optimizer, item, modules, projections, variant) -> torch.Tensor:
    """An example's Adam row written out: autograd gradient, one Adam step from the optimizer's
    own moments (read by parameter), the run's projection ``P_out^T Gamma P_in`` (or none)."""
    grads = param_grads(model, item)
    opt = getattr(optimizer, "optimizer", optimizer)
    params = dict(model.named_parameters())
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    blocks = []
    for module in modules:
        state = opt.state[params[f"{module}.weight"]]
        g = grads[f"{module}.weight"].double()
        m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
        m2, v2 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        gamma = m2 / (v2.sqrt() + eps) if variant == "paper" else m2 / torch.sqrt(v2 + eps)
        if f"{module}::in" in projections:
            gamma = projections[f"{module}::out"].double().T @ gamma @ projections[f"{module}::in"].double()
        blocks.append(gamma.flatten())
    return torch.cat(blocks)


def assert_rows_match(store, model, optimizer, projections, variant, items):
    modules = store.layout.names
    assert modules and all("lora_" in m for m in modules)
    for item in items:
        expected = expected_adam_row(model, optimizer, item, modules, projections, variant)
        got = store.get([item["id"]])[0].double()
        assert torch.allclose(got, expected, rtol=2e-4, atol=1e-5 * expected.abs().max()), item["id"]


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_adam_rows_equal_explicit_adam_step_of_autograd_gradients(logged, variant):
    project, trainer, _ = logged
    run_dir = project / "final"
    store = Store(run_dir / "stores" / ADAM_STORES[variant])
    assert sorted(store.ids) == sorted(it["id"] for it in TRAIN)
    projections = load_file(str(run_dir / "projection.safetensors"))
    assert_rows_match(store, trainer.model, trainer.optimizer, projections, variant, TRAIN[:5])


@pytest.mark.parametrize("projection", ["pca", "none"])
def test_less_extract_with_pca_or_no_projection(tmp_path, projection):
    """Without the Trainer: AdamW steps by hand, then less_extract on the model as it is."""
    model = lora_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for start in (0, 4, 8):
        model(**collate(TRAIN[start:start + 4])).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    config = {"projection": {"type": projection, "rank_in": 3, "rank_out": 2},
              "statistics": {"kfac": False, "ekfac": False}, "store": {"dtype": "float32"}}
    run = Run("ckpt", config=config, root=tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    less_extract(run, model, TRAIN, collate, optimizer=opt, queries=VAL, batch_size=5, loss_fn=token_mean_loss,
                 progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    path = run.dir / "projection.safetensors"
    projections = load_file(str(path)) if path.exists() else {}
    assert bool(projections) == (projection == "pca")
    for variant in ("paper", "code"):
        store = Store(run.dir / "stores" / ADAM_STORES[variant])
        assert store.dim == Store(run.dir / "stores" / "queries").dim
        assert_rows_match(store, model, opt, projections, variant, TRAIN[::3])
    if projection == "none":  # stored full per-example gradients + stored moments -> the Adam rows
        plain = Store(run.dir / "stores" / "train")
        stored = load_moments(run.dir / MOMENTS_FILE)
        for variant in ("paper", "code"):
            adam = Store(run.dir / "stores" / ADAM_STORES[variant])
            for block in plain.layout.blocks:
                g = plain.get(adam.ids, modules=[block.name]).double().view(-1, *block.shape)
                name = f"{block.name}.weight"
                (b1, b2), eps = stored.betas[name], stored.eps[name]
                m, v = stored.exp_avg[name].double(), stored.exp_avg_sq[name].double()
                m2, v2 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
                gamma = m2 / (v2.sqrt() + eps) if variant == "paper" else m2 / torch.sqrt(v2 + eps)
                got = adam.read_all(modules=[block.name]).double().view_as(gamma)
                assert torch.allclose(got, gamma, rtol=1e-5, atol=1e-6 * gamma.abs().max()), block.name
            assert stored.step[name] == 3 and (b1, b2, eps) == (0.9, 0.999, 1e-8)


def test_adam_transform_formula():
    g, m, v = torch.tensor([0.5, -2.0]), torch.tensor([0.1, 0.2]), torch.tensor([0.01, 0.0])
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g**2
    assert torch.allclose(adam_transform(g, m, v, 0.9, 0.999, 1e-3, "paper"), m2 / (v2.sqrt() + 1e-3))
    assert torch.allclose(adam_transform(g, m, v, 0.9, 0.999, 1e-3, "code"), m2 / (v2 + 1e-3).sqrt())
    with pytest.raises(ConfigError, match="paper"):
        adam_transform(g, m, v, 0.9, 0.999, 1e-3, "papr")


def explicit_less(project, tasks: dict, variant: str) -> dict:
    """The LESS formula as loops: checkpoints, tasks, validation examples, candidates."""
    entries = json.loads((project / "checkpoints.json").read_text())["checkpoints"]
    lrs = [e["learning_rate"] for e in entries]
    out: dict = {}
    for entry, lr in zip(entries, lrs):
        w = lr / sum(lrs)
        adam = Store(project / entry["dir"] / "stores" / ADAM_STORES[variant])
        val = Store(project / entry["dir"] / "stores" / "queries")
        for tid in adam.ids:
            x = adam.get([tid])[0].double()
            for task, ids in tasks.items():
                vs = [val.get([v])[0].double() for v in ids]
                if variant == "paper":
                    term = F.cosine_similarity(x, torch.stack(vs).mean(0), dim=0).item()
                else:
                    term = sum(F.cosine_similarity(x, v, dim=0).item() for v in vs) / len(vs)
                out.setdefault(tid, {}).setdefault(task, 0.0)
                out[tid][task] += w * term
    return out


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_less_scores_equal_the_explicit_formula(logged, variant):
    project = logged[0]
    tasks = {"first": ["val-0", "val-1", "val-2"], "second": ["val-3", "val-4"]}
    result = less_scores(project, tasks, variant=variant, progress=False)
    expected = explicit_less(project, tasks, variant)
    assert sorted(result.train_ids) == sorted(expected)
    assert result.tasks == ["first", "second"] and result.checkpoints == ["step-2", "final"]
    assert abs(sum(result.weights) - 1) < 1e-12
    for k, tid in enumerate(result.train_ids):
        per_task = [expected[tid][t] for t in result.tasks]
        assert result.per_task[k].tolist() == pytest.approx(per_task, abs=1e-6)
        assert result.scores[k].item() == pytest.approx(max(per_task), abs=1e-6)
        assert result.best_task[k] == result.tasks[per_task.index(max(per_task))]
    top = result.top(3)
    assert [expected[t][result.best_task[result.train_ids.index(t)]] for t in top] == sorted(
        (max(expected[t].values()) for t in expected), reverse=True)[:3]
    # the two variants rank differently (they are different formulas)
    other = less_scores(project, tasks, variant="code" if variant == "paper" else "paper", progress=False)
    assert not torch.allclose(other.scores, result.scores)


def test_one_task_of_every_validation_row_by_default(logged):
    project = logged[0]
    result = less_scores(project, progress=False)
    assert result.tasks == ["all"] and sorted(result.val_ids["all"]) == sorted(it["id"] for it in VAL)
    assert torch.equal(result.scores, result.per_task[:, 0])


def test_training_with_moments_and_adam_rows_is_bit_identical(tmp_path, logged):
    plain = train(tmp_path / "plain")
    logged_model = logged[1].model
    for (name, a), (_, b) in zip(plain.model.named_parameters(), logged_model.named_parameters()):
        assert torch.equal(a, b), name
    opt_a = getattr(plain.optimizer, "optimizer", plain.optimizer)
    opt_b = getattr(logged[1].optimizer, "optimizer", logged[1].optimizer)
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        assert torch.equal(opt_a.state[pa]["exp_avg_sq"], opt_b.state[pb]["exp_avg_sq"])


def test_bad_input_raises_clear_errors(tmp_path, logged):
    project = logged[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirectoryError, match="no checkpoints"):
        less_scores(tmp_path / "empty", progress=False)
    with pytest.raises(RunDirectoryError, match="does not exist"):
        less_scores(tmp_path / "missing", progress=False)
    with pytest.raises(ConfigError, match=r"Unknown LESS tasks \['nope'\].*'all'"):
        less_scores(project, tasks=["nope"], progress=False)
    with pytest.raises(ConfigError, match="val-99"):
        less_scores(project, {"t": ["val-0", "val-99"]}, progress=False)
    with pytest.raises(ConfigError, match="variant"):
        less_scores(project, variant="exact", progress=False)
    with pytest.raises(StatisticsError, match="optimizer_states=True"):
        load_moments(tmp_path / MOMENTS_FILE)
    # a project logged without Adam rows
    cb = LogixCallback(CONFIG, project="plain", root=tmp_path, queries=VAL, progress=False)
    train(tmp_path, steps=2, callback=cb)
    with pytest.raises(StatisticsError, match="adam_rows=True"):
        less_scores(tmp_path / "plain", progress=False)
    # an optimizer without Adam moments
    model = lora_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(**collate(TRAIN[:2])).loss.backward()
    sgd.step()
    with pytest.raises(StatisticsError, match="Adam or AdamW"):
        optimizer_moments(model, sgd)
    with pytest.raises(StatisticsError, match="No optimizer"):
        optimizer_moments(model, None)
    # a logged module whose weights do not train has no moments
    adam = torch.optim.AdamW([p for n, p in model.named_parameters() if "lora_A" in n])
    model(**collate(TRAIN[:2])).loss.backward()
    adam.step()
    run = Run("frozen", config=CONFIG, root=tmp_path)
    run.watch(model)
    with pytest.raises(StatisticsError, match="lora_B.*no Adam moments") as err:
        module_moments(model, run, optimizer_moments(model, adam))
    assert isinstance(err.value, LogixError) and "trainable_only" in str(err.value)


@pytest.mark.slow
def test_warmup_and_log_end_to_end(tmp_path):
    model = lora_model()
    pool = dataset(30, seed=3, prefix="pool")
    val = {"a": dataset(3, seed=4, prefix="a"), "b": dataset(2, seed=5, prefix="b")}
    warm = warmup_and_log(model, pool, val, collate, fraction=0.2, epochs=2, lr=1e-2, batch_size=3,
                          config={"projection": {"rank_in": 3, "rank_out": 2}}, root=tmp_path, progress=False,
                          variants=["paper"])
    assert len(warm.warmup_ids) == 6 and set(warm.warmup_ids) <= {it["id"] for it in pool}
    entries = json.loads((warm.project_dir / "checkpoints.json").read_text())["checkpoints"]
    assert [e["name"] for e in entries] == ["epoch-1", "epoch-2"]
    assert entries[0]["learning_rate"] > entries[1]["learning_rate"]
    result = less_scores(warm.project_dir, progress=False)  # tasks from less.json
    assert result.tasks == ["a", "b"] and len(result.train_ids) == 30
    assert result.per_task.abs().max() <= 1 + 1e-9
    with pytest.raises(StatisticsError, match="adam_rows"):
        less_scores(warm.project_dir, variant="code", progress=False)


@pytest.mark.slow
def test_less_selection_example_prefers_the_target_families(tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(root / "examples" / "less_selection.py"), "--root", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True, cwd=root, env=env).stdout
    shares = dict(re.findall(r"^  (LESS \(paper\)|LESS \(code\)|random pick)\s+([\d.]+)%", out, re.M))
    assert set(shares) == {"LESS (paper)", "LESS (code)", "random pick"}, out
    assert float(shares["LESS (paper)"]) > 1.5 * float(shares["random pick"]), out
    assert "top 8 candidates" in out

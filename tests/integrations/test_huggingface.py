"""The Trainer callback logs exactly what the manual ``Run`` loop logs, and changes no training.

Oracle: a second Trainer trained to the same step without the callback, then logged by hand
with ``with run(...)`` and a per-example summed loss, gives the same rows per id. Training with
the callback ends in bit-identical weights (the callback restores grads, RNG and modes).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import logix
from logix.analysis import compute_influence, influence, load_checkpoint
from logix.integrations import extract, held_fixed
from logix.integrations.huggingface import LogixCallback
from tests.helpers import collate

hf_logging.set_verbosity_error()
VOCAB = 50


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return GPT2LMHeadModel(cfg)


def dataset(n: int = 12, seed: int = 0) -> list[dict]:
    """Examples of varying length; the first 3 tokens are a 'prompt' without loss."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(5, 12, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        items.append({"id": f"ex-{i}", "input_ids": ids, "labels": [-100] * 3 + ids[3:],
                      "text": "not a model input"})
    return items




def args(tmp_path, steps: int, accum: int = 1) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=accum, learning_rate=5e-2, lr_scheduler_type="linear",
        report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )


# float32 rows: the rows are compared to a manual loop's (another batching) at float32 tolerances
CONFIG = {"projection": {"rank_in": 4, "rank_out": 3}, "store": {"dtype": "float32"},
          "schedule": {"steps": [2], "batch_size": 5}}


def train(tmp_path, steps, accum=1, callback=None, model=None):
    model = model if model is not None else tiny_gpt2()
    trainer = Trainer(model=model, args=args(tmp_path, steps, accum), train_dataset=dataset(),
                      data_collator=collate, callbacks=[callback] if callback else [])
    trainer.train()
    return trainer.model


def manual_rows(tmp_path, model, name, config=CONFIG) -> logix.Store:
    """The README's manual loop: ``with run(...)`` around a per-example summed loss."""
    run = logix.init(name, config=config, root=tmp_path / "manual", overwrite=True)
    run.watch(model)
    model.eval()
    items = dataset()
    for lo in range(0, len(items), 4):
        chunk = items[lo:lo + 4]
        batch = collate(chunk)
        with run(data_id=[it["id"] for it in chunk], mask=batch["attention_mask"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                            ignore_index=-100, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return run.finalize()


def assert_same_rows(a: logix.Store, b: logix.Store) -> None:
    assert sorted(a.ids) == sorted(b.ids)
    ids = sorted(a.ids)
    torch.testing.assert_close(a.get(ids), b.get(ids), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_callback_rows_equal_manual_loop_and_training_is_unchanged(tmp_path, accum):
    cb = LogixCallback(CONFIG, project="cb", root=tmp_path, progress=False)
    trained = train(tmp_path, steps=3, accum=accum, callback=cb)
    names = [c["name"] for c in cb.checkpoints]
    assert names == ["step-2", "final"]
    assert [c["step"] for c in cb.checkpoints] == [2, 3]
    assert all(c["learning_rate"] is not None for c in cb.checkpoints)

    reference = train(tmp_path, steps=3, accum=accum)  # no callback
    for p, q in zip(trained.parameters(), reference.parameters()):
        assert torch.equal(p, q), "the callback changed training"

    final_store = logix.load_run_store(tmp_path / "cb" / "final")
    assert_same_rows(final_store, manual_rows(tmp_path, trained, "final"))
    assert final_store.n_rows == len(dataset())


def test_checkpoint_rows_reflect_the_model_at_that_step(tmp_path):
    """Rows logged at step 2 equal rows of the model saved at step 2 by a second callback."""
    snapshots = {}

    class Snapshot(LogixCallback):
        def _log(self, state, kwargs, name):
            snapshots[name] = {k: v.detach().clone() for k, v in kwargs["model"].state_dict().items()}
            super()._log(state, kwargs, name)

    cb = Snapshot(CONFIG, project="cb", root=tmp_path, progress=False)
    train(tmp_path, steps=3, callback=cb)
    model = tiny_gpt2()
    model.load_state_dict(snapshots["step-2"])
    assert_same_rows(logix.load_run_store(tmp_path / "cb" / "step-2"), manual_rows(tmp_path, model, "s2"))
    assert not torch.equal(snapshots["step-2"]["lm_head.weight"], snapshots["final"]["lm_head.weight"])


def test_callback_with_peft_lora_logs_lora_modules(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                   lora_dropout=0.0, fan_in_fan_out=True))
    cb = LogixCallback({**CONFIG, "schedule": {"at_end": True}}, project="lora", root=tmp_path, progress=False)
    trained = train(tmp_path, steps=2, callback=cb, model=model)
    store = logix.load_run_store(tmp_path / "lora" / "final")
    assert store.modules and all("lora_" in m for m in store.modules)
    assert len(store.modules) == 4  # lora_A and lora_B of c_attn and c_fc
    assert_same_rows(store, manual_rows(tmp_path, trained, "lora"))


def test_queries_and_checkpoint_weighted_influence(tmp_path):
    queries = dataset(4, seed=1)
    for q in queries:
        q["id"] = "q" + q["id"]
    cfg = {**CONFIG, "schedule": {"steps": [1, 2], "at_end": False, "batch_size": 5}}
    cb = LogixCallback(cfg, project="cb", root=tmp_path, queries=queries, progress=False)
    train(tmp_path, steps=2, callback=cb)
    index = json.loads((tmp_path / "cb" / "checkpoints.json").read_text())["checkpoints"]
    lrs = [c["learning_rate"] for c in index]
    assert len(index) == 2 and lrs[0] > lrs[1] > 0

    result = influence(tmp_path / "cb", preconditioner="identity", top_k=3, progress=False)
    assert result.query_ids == [q["id"] for q in queries]
    # oracle: the lr-weighted sum of each checkpoint's identity scores
    full = 0
    for c, lr in zip(index, lrs):
        cp = load_checkpoint(tmp_path / "cb" / c["dir"], "identity")
        full = full + lr / sum(lrs) * (cp.queries.double() @ cp.train.read_all().double().T)
    order = full.argsort(dim=1, descending=True)[:, :3]
    ids = logix.load_run_store(tmp_path / "cb" / "step-1").ids
    assert result.top_ids == [[ids[j] for j in row] for row in order.tolist()]
    torch.testing.assert_close(result.top_scores.double(), full.gather(1, order), rtol=1e-4, atol=1e-8)
    single = compute_influence(load_checkpoint(tmp_path / "cb" / "step-1", "identity"), top_k=3, progress=False)
    assert not torch.allclose(single.top_scores.double(), result.top_scores.double())


def test_extract_restores_model_state_and_resumes(tmp_path):
    model = tiny_gpt2().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    rng = torch.get_rng_state()
    run = logix.init("x", config=CONFIG, root=tmp_path)
    store = extract(run, model, dataset(), collate, batch_size=5, progress=False)
    assert store.n_rows == 12 and model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # a finalized run is not logged again; the same call returns the same store
    again = extract(logix.init("x", config=CONFIG, root=tmp_path), model, dataset(), collate, progress=False)
    assert again.n_rows == 12


def test_held_fixed_restores_on_error():
    model = tiny_gpt2().train()
    with pytest.raises(RuntimeError), held_fixed(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training


def test_missing_id_column_error_names_the_fix(tmp_path):
    items = [{k: v for k, v in it.items() if k != "id"} for it in dataset(4)]
    run = logix.init("noid", config={**CONFIG, "data": {"ids": "column"}}, root=tmp_path)
    with pytest.raises(logix.LogixError, match="no 'id' column.*data.ids=hash"):
        extract(run, tiny_gpt2(), items, collate, ids="column", progress=False)


def test_chosen_base_modules_of_a_lora_model(tmp_path):
    """``trainable_only: false`` + globs log frozen base layers; LoRA B starts at 0, so the base
    layer's gradient equals the plain model's gradient of the same layer (oracle)."""
    from peft import LoraConfig, get_peft_model

    plain = tiny_gpt2()
    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"],
                                                        lora_dropout=0.0, fan_in_fan_out=True))
    # projection none: random projections are seeded by module name, and the names differ
    cfg = {"projection": {"type": "none"}, "store": {"dtype": "float32"},
           "capture": {"modules": ["*h.0.mlp.c_fc.base_layer"], "trainable_only": False}}
    run = logix.init("base", config=cfg, root=tmp_path)
    store = extract(run, peft_model, dataset(), collate, batch_size=5, progress=False)
    assert store.modules == ["base_model.model.transformer.h.0.mlp.c_fc.base_layer"]
    base = peft_model.get_base_model().transformer.h[0].mlp.c_fc.base_layer
    assert not base.weight.requires_grad and base.weight.grad is None  # restored
    oracle_cfg = {"projection": {"type": "none"}, "store": {"dtype": "float32"},
                  "capture": {"modules": ["transformer.h.0.mlp.c_fc"]}}
    oracle = manual_rows(tmp_path, plain, "plain", config=oracle_cfg)
    ids = sorted(store.ids)
    torch.testing.assert_close(store.get(ids), oracle.get(ids), rtol=1e-4, atol=1e-6)


def test_summed_loss_sampling_is_seeded_and_follows_the_model():
    from logix.integrations import summed_loss

    model = tiny_gpt2().eval()
    batch = collate(dataset(4))
    real = summed_loss(model, batch)
    gen = torch.Generator().manual_seed(0)
    a = summed_loss(model, batch, sample_labels=True, generator=gen)
    b = summed_loss(model, batch, sample_labels=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.equal(a, real)
    # with one class made certain, every draw is that class: the loss is ~0 on every label token
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[7] = 0.0
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[7].fill_(100.0)
    assert float(summed_loss(model, batch, sample_labels=True, generator=gen).detach()) < 1e-6
    assert float(summed_loss(model, batch).detach()) > 100


def test_extract_with_true_fisher_keeps_rows_and_changes_curvature(tmp_path):
    model = tiny_gpt2()
    runs = {}
    for fisher in ("empirical", "true"):
        cfg = {**CONFIG, "statistics": {"kfac": True, "ekfac": False, "fisher": fisher}}
        run = logix.init(fisher, config=cfg, root=tmp_path)
        extract(run, model, dataset(), collate, batch_size=5, progress=False)
        runs[fisher] = run
    assert runs["true"].passes == ["kfac", "log"]
    assert_same_rows(runs["true"].store(), runs["empirical"].store())
    name = "lm_head"
    s_true, s_emp = runs["true"].statistics.mean(name, "S"), runs["empirical"].statistics.mean(name, "S")
    assert not torch.allclose(s_true, s_emp, rtol=1e-2)
    torch.testing.assert_close(runs["true"].statistics.mean(name, "A"), runs["empirical"].statistics.mean(name, "A"))


def test_rerun_with_another_model_is_an_error_not_stale_rows(tmp_path):
    cfg = {**CONFIG, "schedule": {"at_end": True}}
    train(tmp_path, steps=2, callback=LogixCallback(cfg, project="cb", root=tmp_path, progress=False))
    again = LogixCallback(cfg, project="cb", root=tmp_path, progress=False)
    with pytest.raises(logix.LogixError, match="another state of the model"):
        train(tmp_path, steps=2, callback=again, model=tiny_gpt2(seed=1))
    # the same training again resumes (same states), and overwrite=True starts afresh
    train(tmp_path, steps=2, callback=LogixCallback(cfg, project="cb", root=tmp_path, progress=False))
    fresh = LogixCallback(cfg, project="cb", root=tmp_path, progress=False, overwrite=True)
    train(tmp_path, steps=2, callback=fresh, model=tiny_gpt2(seed=1))
    assert [c["name"] for c in fresh.checkpoints] == ["final"]


def test_checkpoints_of_an_earlier_training_run_are_dropped_from_the_index(tmp_path):
    first = LogixCallback({**CONFIG, "schedule": {"steps": [1], "at_end": False}}, project="cb",
                          root=tmp_path, progress=False)
    train(tmp_path, steps=2, callback=first)
    second = LogixCallback({**CONFIG, "schedule": {"steps": [2], "at_end": False}}, project="cb",
                           root=tmp_path, progress=False)
    train(tmp_path, steps=2, callback=second)
    index = json.loads((tmp_path / "cb" / "checkpoints.json").read_text())["checkpoints"]
    assert [c["name"] for c in index] == ["step-2"]


@pytest.mark.parametrize("found", [True, False])
def test_ids_the_trainer_drops_are_kept(tmp_path, caplog, monkeypatch, found):
    """With a datasets.Dataset the Trainer removes the id column from its dataloader's copy
    (remove_unused_columns): the callback logs the Trainer's own dataset, so the ids are the
    dataset's, with no setting. If the Trainer cannot be found (``found=False``), the callback
    says that ids are token hashes and how to keep them, and train_dataset= keeps them."""
    from datasets import Dataset

    import logix.integrations.huggingface as hf

    if not found:
        monkeypatch.setattr(hf, "_calling_trainer_dataset", lambda: None)
    items = Dataset.from_list(dataset())
    cfg = {**CONFIG, "schedule": {"at_end": True}}
    for name, extra in (("plain", {}), ("given", {"train_dataset": items})):
        cb = LogixCallback(cfg, project=name, root=tmp_path, progress=False, **extra)
        trainer = Trainer(model=tiny_gpt2(), args=args(tmp_path / name, 2), train_dataset=items,
                          data_collator=collate, callbacks=[cb])
        assert "id" not in trainer.get_train_dataloader().dataset.column_names  # what callbacks are handed
        with caplog.at_level("WARNING", logger="logix"):
            trainer.train()
        train_ids = set(logix.load_store(tmp_path / name / "final" / "stores" / "train").ids)
        warned = "train ids are hashes of the tokens" in caplog.text
        if name == "plain" and not found:
            assert warned and "train_dataset=train_ds" in caplog.text and not train_ids & set(items["id"])
        else:
            assert train_ids == set(items["id"]) and not warned
        caplog.clear()

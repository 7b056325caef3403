"""The Trainer callback's summaries reach the Trainer's own trackers (TrainingArguments.report_to).

TensorBoard for real: the event file the callback wrote is read back with TensorBoard's own
reader and its scalars are compared with the logged stores. W&B: a stand-in ``wandb`` module
(as the WandbCallback leaves it: ``wandb.run`` active) records the calls.
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.utils import logging as hf_logging

from logix.integrations.huggingface import LogixCallback
from logix.integrations.trackers import Tracker, TrackerWriter, requested_trackers
from tests.helpers import collate

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

hf_logging.set_verbosity_error()
VOCAB, N_TRAIN, N_QUERY = 40, 8, 3
CONFIG = {"projection": {"rank_in": 4, "rank_out": 3}, "schedule": {"steps": [2], "batch_size": 4}}


def items(n: int, prefix: str) -> list[dict]:
    gen = torch.Generator().manual_seed(len(prefix) + n)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(4, 9, (1,), generator=gen)),), generator=gen).tolist()
        out.append({"id": f"{prefix}{i}", "input_ids": ids, "labels": ids})
    return out


def train(tmp_path: Path, report_to, callback: LogixCallback, steps: int = 3) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=report_to, save_strategy="no", logging_steps=1,
                             seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=items(N_TRAIN, "t"), data_collator=collate,
                      callbacks=[callback])
    trainer.train()
    return trainer


def callback(tmp_path: Path, **kw) -> LogixCallback:
    return LogixCallback(CONFIG, project="p", root=tmp_path / "runs", queries=items(N_QUERY, "q"),
                         progress=False, **kw)


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_each_checkpoints_summary_beside_the_trainers_curves(tmp_path):
    cb = callback(tmp_path)
    trainer = train(tmp_path, ["tensorboard"], cb)
    tb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback))
    ours, theirs = scalars(Path(tb.logging_dir) / "logix"), scalars(Path(tb.logging_dir))
    assert "train/loss" in theirs and not any(tag.startswith("logix/") for tag in theirs)
    runs = cb.runs()
    assert [c["step"] for c in cb.checkpoints] == [2, 3]  # step-2 and final
    assert [s for s, _ in ours["logix/rows"]] == [2, 3]
    for (step, rows), run in zip(ours["logix/rows"], runs):
        store = run.store()
        assert rows == store.n_rows == N_TRAIN
        at = {tag: dict(values)[step] for tag, values in ours.items()}
        assert at["logix/query_rows"] == N_QUERY
        assert at["logix/modules"] == len(store.modules) and at["logix/row_dim"] == store.dim
        assert at["logix/row_bytes"] == store.nbytes()
        disk = sum(p.stat().st_size for p in run.dir.rglob("*") if p.is_file())
        assert at["logix/disk_bytes"] == pytest.approx(disk, rel=1e-6)
        assert at["logix/seconds"] > 0 and at["logix/rows_per_second"] == pytest.approx(N_TRAIN / at["logix/seconds"],
                                                                                        rel=1e-5)
        assert at["logix/nonfinite_skipped"] == 0 and at["logix/nonfinite_batches"] == 0


def test_report_to_none_on_the_callback_writes_nothing(tmp_path):
    trainer = train(tmp_path, ["tensorboard"], callback(tmp_path, report_to="none"), steps=2)
    tb = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback))
    assert not (Path(tb.logging_dir) / "logix").exists()


@pytest.fixture
def fake_wandb(monkeypatch):
    calls: list[dict] = []
    module = types.ModuleType("wandb")
    module.run = types.SimpleNamespace(log=lambda data: calls.append(dict(data)))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module, calls


def test_wandb_run_gets_the_summaries_on_the_trainers_step_metric(tmp_path, fake_wandb):
    _, calls = fake_wandb
    cb = callback(tmp_path, report_to=["wandb"])  # the Trainer's own W&B callback needs the real package
    train(tmp_path, [], cb)
    assert [c["train/global_step"] for c in calls] == [2, 3]
    assert all(c["logix/rows"] == N_TRAIN and c["logix/query_rows"] == N_QUERY for c in calls)
    assert not (tmp_path / "out" / "runs").exists()  # no TensorBoard asked for


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, fake_wandb, caplog):
    module, _ = fake_wandb
    module.run = None  # W&B asked for, but no run was started
    with caplog.at_level(logging.WARNING, logger="logix"):
        cb = callback(tmp_path, report_to="wandb")
        train(tmp_path, [], cb)
    warnings = [r for r in caplog.records if "could not write summaries to wandb" in r.getMessage()]
    assert len(warnings) == 1 and len(cb.checkpoints) == 2


@pytest.mark.parametrize("report_to, expected", [
    (None, []), ("none", []), ([], []), (["none"], []), ("tensorboard", [Tracker.TENSORBOARD]),
    (["wandb", "mlflow"], [Tracker.WANDB]), ("all", [Tracker.TENSORBOARD, Tracker.WANDB]),
    (["all"], [Tracker.TENSORBOARD, Tracker.WANDB]),
])
def test_requested_trackers(report_to, expected):
    assert requested_trackers(report_to) == expected


def test_tensorboard_directory_outside_a_trainer(tmp_path, monkeypatch):
    args = types.SimpleNamespace(report_to=["tensorboard"], output_dir=str(tmp_path))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert TrackerWriter.for_trainer(args).tensorboard_dir == tmp_path / "runs" / "logix"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    writer = TrackerWriter.for_trainer(args)
    assert writer.tensorboard_dir == tmp_path / "tb" / "logix"
    writer.log({"logix/x": 2.5}, step=7)
    writer.close()
    assert scalars(tmp_path / "tb" / "logix")["logix/x"] == [(7, 2.5)]

"""Influence from a HuggingFace ``Trainer`` run: ``LogixCallback`` logs at the end of each epoch.

The training script is an ordinary ``Trainer`` fine-tune of a tiny GPT-2 (seeded random
weights, no download) on the shipped instruction data; logix adds two lines, marked
``# logix line``: the import and ``callbacks=[LogixCallback(config, queries=query_ds)]``.

The config's ``schedule`` section says when the callback logs: here at the end of epochs 1
and 2. At each of those points it pauses training, logs every training example's projected
gradient and the queries' (with the model as it is then) into one run directory per
checkpoint, writes ``checkpoints.json`` (step, epoch, learning rate), and resumes training
exactly where it was. ``logix.analysis.influence(<project dir>)`` then sums the
checkpoints' scores weighted by their learning rates (TracIn-style).

    python examples/trainer_callback.py                   # ~30 s on 2 CPU cores
    python examples/trainer_callback.py --train 1200 --root /tmp/logix_runs
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import yaml
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import logix
from logix.analysis import checkpoint_weights, influence
from logix.data import InstructionDataset, PadCollator, load_jsonl, load_tokenizer
from logix.integrations.huggingface import LogixCallback  # logix line 1

DATA = Path(__file__).resolve().parent / "data"


def tiny_gpt2(tokenizer, seed: int) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with seeded random weights (use ``from_pretrained`` for a real one)."""
    torch.manual_seed(seed)
    special = tokenizer.eos_token_id  # <|endoftext|>: bos, eos and pad of the shipped tokenizer
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return GPT2LMHeadModel(config)


def show(record: dict, width: int = 60) -> str:
    """``instruction input -> output`` of a record, on one line."""
    text = " ".join(f"{record['instruction']} {record['input']}".split())
    text = text if len(text) <= width else text[: width - 3] + "..."
    return f"{text} -> {record['output']}"


def category_share(result, train_cat: dict, query_cat: dict) -> tuple[float, float]:
    """Share of the top-k proponents from the query's own category, and what random picks give."""
    hits = sum(train_cat[t] == query_cat[q] for q, top in zip(result.query_ids, result.top_ids) for t in top)
    share = hits / sum(len(top) for top in result.top_ids)
    cats = list(train_cat.values())
    random_share = sum(cats.count(query_cat[q]) / len(cats) for q in result.query_ids) / len(result.query_ids)
    return share, random_share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="logix_runs", help="folder of the project directory")
    parser.add_argument("--train", type=int, default=600, help="training examples (a random sample)")
    parser.add_argument("--queries", type=int, default=60, help="queries logged (of the shipped 60)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--show", type=int, default=3, help="queries printed with their proponents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()

    tokenizer = load_tokenizer(str(DATA / "tokenizer.json"))
    records = random.Random(args.seed).sample(load_jsonl(DATA / "instructions.jsonl"), args.train)
    train_ds = InstructionDataset(records, tokenizer, max_length=64)  # items carry their "id"
    query_records = load_jsonl(DATA / "queries.jsonl")
    query_records = query_records[:: max(1, len(query_records) // args.queries)][: args.queries]
    query_ds = InstructionDataset(query_records, tokenizer, max_length=64)

    # The logix config: a dict, a YAML file or a logix.Config. `schedule` is the callback's part.
    config = logix.Config.from_dict({
        "root": args.root,
        "projection": {"type": "orthogonal", "rank_in": 16, "rank_out": 16},
        "statistics": {"kfac": True},
        "schedule": {
            "epochs": [1, 2],   # log at the end of epochs 1 and 2 ...
            "at_end": False,    # ... and not again when training ends (epoch 2 *is* the end)
            "batch_size": 32,   # examples per logging batch
        },
    })
    print("schedule section of the config:")
    print("  " + yaml.safe_dump({"schedule": config.to_dict()["schedule"]}, sort_keys=False)
          .strip().replace("\n", "\n  "))

    training_args = TrainingArguments(
        output_dir=str(Path(args.root) / "trainer_output"), num_train_epochs=2,
        per_device_train_batch_size=16, learning_rate=args.lr, lr_scheduler_type="linear",
        seed=args.seed, save_strategy="no", report_to=[], logging_strategy="epoch",
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    # overwrite=True: a rerun starts afresh (by default the callback resumes the project directory,
    # keeping checkpoints already logged there -- right after a crash, stale after a code change)
    trainer = Trainer(
        model=tiny_gpt2(tokenizer, args.seed), args=training_args, train_dataset=train_ds,
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[LogixCallback(config, queries=query_ds, overwrite=True)],  # logix line 2
    )
    trainer.train()
    losses = [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]
    print(f"\ntraining loss per epoch: {losses}")

    # ---- what the callback wrote: one run per checkpoint, listed in checkpoints.json -------------
    project = Path(args.root) / "trainer"  # <root>/<project> (LogixCallback(project="trainer"))
    entries = json.loads((project / "checkpoints.json").read_text())["checkpoints"]
    weights = checkpoint_weights(entries, "lr")
    print(f"\ncheckpoints.json ({len(entries)} entries; lr: mean learning rate since the previous one):")
    for entry, weight in zip(entries, weights):
        store = logix.load_run_store(project / entry["dir"])
        print(f"  {entry['name']:<8} step {entry['step']:>3}  epoch {entry['epoch']:.1f}  "
              f"lr {entry['learning_rate']:.3e}  weight {weight:.3f}  ({store.n_rows} rows)")

    # ---- influence summed over the checkpoints, lr-weighted ----------------------------------------
    result = influence(project, preconditioner="kfac", weighting="lr", top_k=args.top_k, progress=False)
    last = influence(project, preconditioner="kfac", weighting="last", top_k=args.top_k, progress=False)

    train_rec, query_rec = dict(zip(train_ds.ids, records)), dict(zip(query_ds.ids, query_records))
    step = max(1, len(result.query_ids) // args.show)
    for q in range(0, step * args.show, step)[: len(result.query_ids)]:
        qid = result.query_ids[q]
        print(f"\nquery {qid}: {show(query_rec[qid])}")
        for tid, score in zip(result.top_ids[q], result.top_scores[q].tolist()):
            print(f"  {score:+10.3e}  [{train_rec[tid]['category']:>10}] {show(train_rec[tid])}")

    share, random_share = category_share(result, {i: r["category"] for i, r in train_rec.items()},
                                         {i: r["category"] for i, r in query_rec.items()})
    overlap = sum(len(set(a) & set(b)) for a, b in zip(result.top_ids, last.top_ids))
    n = sum(len(top) for top in result.top_ids)
    print(f"\nsame-category share of the top-{args.top_k} proponents: {share:.1%} (random: {random_share:.1%})")
    print(f"top-{args.top_k} proponents shared with the last checkpoint alone: {overlap / n:.1%}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

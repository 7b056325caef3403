"""Influence through LoRA adapters: PEFT + ``Trainer`` + ``LogixCallback``, EK-FAC, self-influence.

A tiny GPT-2 (seeded random weights, no download; ``from_pretrained`` a real one instead)
gets PEFT LoRA adapters on its attention (``c_attn``) and MLP (``c_fc``) layers and is
fine-tuned with the HuggingFace ``Trainer``; only the adapters train. logix adds two lines,
marked ``# logix line``. With ``capture.trainable_only: true`` (the default) logix captures
only modules whose weights train -- the ``lora_A`` / ``lora_B`` Linear layers -- so each
example's row is small. ``statistics.ekfac: true`` adds a pass that fits the EK-FAC
eigenvalue corrections, used by ``preconditioner="ekfac"``.

Besides each query's proponents, the example lists the training examples with the highest
*self-influence* ``g^T H^-1 g``: the ones the model finds most surprising (outliers, and in
real data often mislabelled or odd examples).

    python examples/lora_influence.py                     # ~30 s on 2 CPU cores
    python examples/lora_influence.py --train 1200 --root /tmp/logix_runs
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import logix
from logix.analysis import influence
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


def pretrain(model, dataset, collate, lr: float, seed: int) -> None:
    """One epoch of full training on other records: a stand-in for a pretrained base model."""
    loader = DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for batch in loader:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


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
    parser.add_argument("--base", type=int, default=600, help="other examples the base model trains on")
    parser.add_argument("--queries", type=int, default=60, help="queries logged (of the shipped 60)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2, help="LoRA learning rate")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--show", type=int, default=3, help="queries printed with their proponents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()

    tokenizer = load_tokenizer(str(DATA / "tokenizer.json"))
    collate = PadCollator(tokenizer.pad_token_id)
    shuffled = random.Random(args.seed).sample(load_jsonl(DATA / "instructions.jsonl"), args.train + args.base)
    records, base_records = shuffled[: args.train], shuffled[args.train :]
    train_ds = InstructionDataset(records, tokenizer, max_length=64)
    query_records = load_jsonl(DATA / "queries.jsonl")
    query_records = query_records[:: max(1, len(query_records) // args.queries)][: args.queries]
    query_ds = InstructionDataset(query_records, tokenizer, max_length=64)

    # GPT-2's c_attn / c_fc are HF Conv1D layers (weights stored transposed): fan_in_fan_out=True.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                      lora_dropout=0.0)
    base = tiny_gpt2(tokenizer, args.seed)
    pretrain(base, InstructionDataset(base_records, tokenizer, max_length=64), collate, 3e-3, args.seed)
    model = get_peft_model(base, lora)  # freezes the base; only lora_A / lora_B train
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA: {trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")

    config = {
        "root": args.root,
        "capture": {"trainable_only": True},      # the default: frozen base layers are skipped
        "projection": {"ranks": {  # [rank_in, rank_out] per module glob; LoRA rank r = 4
            "*lora_A*": [16, 4],   # lora_A: Linear 64 -> 4, input projected to 16
            "*lora_B*": [4, 16],   # lora_B: Linear 4 -> 192 / 256, output projected to 16
        }},
        "statistics": {"kfac": True, "ekfac": True},  # EK-FAC: one more pass per checkpoint
        "schedule": {"at_end": True, "batch_size": 32},  # log the final model
    }
    training_args = TrainingArguments(
        output_dir=str(Path(args.root) / "trainer_output"), num_train_epochs=args.epochs,
        per_device_train_batch_size=16, learning_rate=args.lr, lr_scheduler_type="linear",
        seed=args.seed, save_strategy="no", report_to=[], logging_strategy="epoch",
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    # overwrite=True: a rerun starts afresh (by default the callback resumes the project directory,
    # keeping checkpoints already logged there -- right after a crash, stale after a code change)
    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_ds,
        data_collator=collate,
        callbacks=[LogixCallback(config, project="lora", queries=query_ds, overwrite=True)],  # logix line 2
    )
    trainer.train()
    losses = [round(e["loss"], 3) for e in trainer.state.log_history if "loss" in e]
    print(f"\ntraining loss per epoch: {losses}")

    # ---- what was logged: only the LoRA adapters ---------------------------------------------------
    run_dir = Path(args.root) / "lora" / "final"
    store = logix.load_run_store(run_dir)
    print(f"\nlogged modules ({len(store.modules)}), block = k_out x k_in of the projected gradient:")
    for block in store.layout.blocks:
        print(f"  {block.name:<60} {block.shape[0]} x {block.shape[1]}")
    print(f"bytes per example: {store.nbytes() / store.n_rows:.0f} ({store.dim} {store.dtype_name} values); "
          f"{store.n_rows} training rows")

    # ---- EK-FAC influence (the project directory; one checkpoint here) -------------------------------
    result = influence(Path(args.root) / "lora", preconditioner="ekfac", top_k=args.top_k, progress=False)

    train_rec, query_rec = dict(zip(train_ds.ids, records)), dict(zip(query_ds.ids, query_records))
    step = max(1, len(result.query_ids) // args.show)
    for q in range(0, step * args.show, step)[: len(result.query_ids)]:
        qid = result.query_ids[q]
        print(f"\nquery {qid}: {show(query_rec[qid])}")
        for tid, score in zip(result.top_ids[q], result.top_scores[q].tolist()):
            print(f"  {score:+10.3e}  [{train_rec[tid]['category']:>10}] {show(train_rec[tid])}")
    share, random_share = category_share(result, {i: r["category"] for i, r in train_rec.items()},
                                         {i: r["category"] for i, r in query_rec.items()})
    print(f"\nsame-category share of the top-{args.top_k} proponents: {share:.1%} (random: {random_share:.1%})")

    # ---- self-influence: the training examples the model finds hardest to explain ------------------
    values = result.self_influence  # one value per training row, in result.train_ids order
    median = values.median().item()
    print(f"\nhighest self-influence (median over the {len(values)} training examples: {median:.3e}):")
    for index in values.argsort(descending=True)[:3].tolist():
        tid = result.train_ids[index]
        print(f"  {values[index].item():.3e}  [{train_rec[tid]['category']:>10}] {show(train_rec[tid])}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

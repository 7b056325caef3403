"""Influence in a plain PyTorch loop: which training examples made the model answer a query?

A tiny GPT-2 (seeded random weights, no download) is fine-tuned for one epoch on a few
hundred of the shipped instruction examples (6 task families: arithmetic, reverse, ...)
with an ordinary AdamW loop -- logix plays no part in training. Then the trained model is
logged with logix (the two lines are marked ``# logix line``), the held-out queries are
logged with the same projection, and KFAC influence names each query's top proponents.

Sanity figure: a query's proponents should mostly come from its own task family, far more
often than the 1-in-6 that random picks give.

    python examples/torch_loop_influence.py                 # ~30 s on 2 CPU cores
    python examples/torch_loop_influence.py --train 1200 --root /tmp/logix_runs
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import logix
from logix.analysis import influence
from logix.data import InstructionDataset, PadCollator, load_jsonl, load_tokenizer
from logix.integrations import summed_loss

DATA = Path(__file__).resolve().parent / "data"


def tiny_gpt2(tokenizer, seed: int) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 with seeded random weights (use ``from_pretrained`` for a real one)."""
    torch.manual_seed(seed)
    special = tokenizer.eos_token_id  # <|endoftext|>: bos, eos and pad of the shipped tokenizer
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return GPT2LMHeadModel(config)


def fine_tune(model, loader, epochs: int, lr: float) -> None:
    """An ordinary training loop (mean loss, AdamW): nothing here knows about logix."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        losses = []
        for batch in loader:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: loss {losses[0]:.2f} (first batch) -> {sum(losses[-10:]) / len(losses[-10:]):.2f} "
              f"(mean of the last 10 batches)")


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
    parser.add_argument("--root", default="logix_runs", help="folder of the run directory")
    parser.add_argument("--train", type=int, default=600, help="training examples (a random sample)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="LoGra projection rank (in and out)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--show", type=int, default=3, help="queries printed with their proponents")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()

    # ---- data and model: the shipped tokenizer and instruction records ---------------------------
    tokenizer = load_tokenizer(str(DATA / "tokenizer.json"))
    records = load_jsonl(DATA / "instructions.jsonl")
    records = random.Random(args.seed).sample(records, args.train)
    train = InstructionDataset(records, tokenizer, max_length=64)  # loss on the response only
    queries = InstructionDataset(load_jsonl(DATA / "queries.jsonl"), tokenizer, max_length=64)
    collate = PadCollator(tokenizer.pad_token_id)  # batches keep the ids: batch["id"]
    model = tiny_gpt2(tokenizer, args.seed)

    # ---- 1. ordinary fine-tuning, without logix -----------------------------------------------------
    shuffled = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                          generator=torch.Generator().manual_seed(args.seed))
    fine_tune(model, shuffled, args.epochs, args.lr)

    # ---- 2. log every training example's projected gradient (the two-line integration) ------------
    config = {"projection": {"rank_in": args.rank, "rank_out": args.rank}, "statistics": {"kfac": True}}
    run = logix.init("torch_loop", config=config, root=args.root, overwrite=True)
    run.watch(model)                                                        # logix line 1
    model.eval()  # no dropout: a gradient per example of the trained model as it is
    loader = DataLoader(train, batch_size=32, collate_fn=collate)
    for pass_ in run.plan():  # one pass here; two with PCA projection or EK-FAC
        print(f"logix {pass_}")
        for batch in loader:
            with run(data_id=batch["id"], mask=batch["attention_mask"]):    # logix line 2
                summed_loss(model, batch).backward()  # a SUM over examples and tokens, not a mean
            model.zero_grad(set_to_none=True)
    store = run.finalize()

    # ---- 3. the queries, logged with the same projection --------------------------------------------
    for batch in DataLoader(queries, batch_size=32, collate_fn=collate):
        with run.log_queries(data_id=batch["id"], mask=batch["attention_mask"]):
            summed_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
    run.finalize()
    print(f"\nlogged {store.n_rows} training rows of {store.dim} values ({len(store.modules)} modules) "
          f"and {run.store('queries').n_rows} queries into {run.dir}")

    # ---- 4. influence: g_query^T (KFAC + damping)^-1 g_train for every pair --------------------------
    result = influence(run.dir, preconditioner="kfac", top_k=args.top_k, progress=False)

    train_rec, query_rec = dict(zip(train.ids, train.records)), dict(zip(queries.ids, queries.records))
    train_cat = dict(zip(train.ids, train.categories()))  # the records' "category" field
    query_cat = dict(zip(queries.ids, queries.categories()))
    shown = range(0, len(result.query_ids), max(1, len(result.query_ids) // args.show))
    for q in list(shown)[: args.show]:
        qid = result.query_ids[q]
        print(f"\nquery {qid} [{query_cat[qid]}]: {show(query_rec[qid])}")
        for tid, score in zip(result.top_ids[q], result.top_scores[q].tolist()):
            print(f"  {score:+10.3e}  [{train_cat[tid]:>10}] {show(train_rec[tid])}")

    share, random_share = category_share(result, train_cat, query_cat)
    print(f"\nsame-category share of the top-{args.top_k} proponents over {len(result.query_ids)} queries: "
          f"{share:.1%} (random: {random_share:.1%})")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

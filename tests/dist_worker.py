"""One rank of the multi-process tests (launched by ``torchrun`` or ``accelerate launch``).

Usage: python dist_worker.py TASK ROOT OUT [JSON options]

Tasks:
  log      log the token model's data (plan: every pass) and its queries, then score them sharded
  score    sharded scoring of an existing run (``run`` option), results to OUT
  crash    like ``log``, but rank 1 kills itself (SIGKILL) in the middle of the log pass
  dup      ranks log overlapping ids: error by default, ``skip`` keeps one row per id
  trainer  HF Trainer + LogixCallback (one checkpoint at the start, one at the end)

Every rank writes ``OUT/rank-R.json`` with what it saw; rank 0 also the merged scores.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import logix
from logix.analysis import load_checkpoint
from logix.analysis.sharded import sharded_influence
from logix.core.distributed import Dist, shard_indices

VOCAB, SEQ = 13, 7


class TokenLM(nn.Module):
    """Embedding -> Linear -> tanh -> Linear over the vocabulary (per-token next-token model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 6)
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, VOCAB)

    def forward(self, tokens):
        return self.head(torch.tanh(self.fc(self.emb(tokens))))


def data(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), torch.randint(0, VOCAB, (n, SEQ), generator=gen), -100)
    return tokens, mask, labels


def summed_loss(model, tokens, labels):
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def log_examples(run, model, prefix, n, batch, seed, indices, kill_after=None, ctx=None):
    tokens, mask, labels = data(n, seed)
    ctx = ctx or run
    done = 0
    for lo in range(0, len(indices), batch):
        idx = list(indices[lo : lo + batch])
        ids = [f"{prefix}{i}" for i in idx]
        with ctx(data_id=ids, mask=mask[idx]):
            summed_loss(model, tokens[idx], labels[idx]).backward()
        model.zero_grad(set_to_none=True)
        done += 1
        if kill_after is not None and done == kill_after:
            time.sleep(1.0)  # let the writer thread commit what was submitted
            os.kill(os.getpid(), signal.SIGKILL)


def log_run(opts, root, kill_rank=None):
    d = Dist.current()
    model = TokenLM()
    wrapped, forward = model, model  # DDP: the forward runs through the inner model (no gradient sync)
    wrap = opts.get("wrap", "ddp") if d.active else "none"
    if wrap == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif wrap == "fsdp1":  # sharded parameters: every forward runs through the wrapper, on all ranks
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = forward = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    elif wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.fc)
        wrapped = forward = fully_shard(model)
    run = logix.init(opts.get("project", "run"), config=opts["config"], root=root)
    run.watch(wrapped)
    n, nq = opts.get("n", 37), opts.get("nq", 5)
    mine = shard_indices(n, d.rank, d.world_size)
    for pass_ in run.plan():
        kill = opts.get("kill_after") if (d.rank == kill_rank and pass_.writes_rows) else None
        log_examples(run, forward, "ex", n, opts.get("batch", 3), 1, mine, kill)
    run.finalize()
    log_examples(run, forward, "q", nq, 2, 2, shard_indices(nq, d.rank, d.world_size), ctx=run.log_queries)
    run.finalize()
    return run


def score(run_dir, out, opts):
    cp = load_checkpoint(run_dir, opts.get("preconditioner", "ekfac"))
    qids = logix.load_store(Path(run_dir) / "stores" / "queries").ids
    result = sharded_influence(cp, out / "scoring", query_ids=qids, mode=opts.get("mode", "dot"),
                               top_k=opts.get("top_k", 5), part_rows=opts.get("part_rows", 5),
                               save_scores=True, progress=False)
    if Dist.current().is_main:
        (out / "scores.json").write_text(json.dumps({
            "query_ids": result.query_ids, "top_ids": result.top_ids,
            "top_scores": result.top_scores.tolist(), "bottom_ids": result.bottom_ids,
            "bottom_scores": result.bottom_scores.tolist(),
            "self_influence": result.self_influence.tolist(), "scores_path": str(result.scores_path),
        }))


def trainer_task(root, out, opts):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from logix.integrations.huggingface import LogixCallback
    from tests.helpers import collate  # the launcher puts the repository root on PYTHONPATH

    hf_logging.set_verbosity_error()
    vocab = 50
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(16):
        length = int(torch.randint(5, 12, (1,), generator=gen))
        ids = torch.randint(1, vocab, (length,), generator=gen).tolist()
        items.append({"id": f"ex-{i}", "input_ids": ids, "labels": [-100] * 3 + ids[3:]})

    args = TrainingArguments(
        output_dir=str(out / "trainer_out"), max_steps=2, per_device_train_batch_size=8 // world,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1, seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    config = {"root": str(root), "projection": {"rank_in": 4, "rank_out": 3},
              "statistics": {"kfac": True},
              "schedule": {"at_start": True, "at_end": True, "epochs": [], "batch_size": 3}}
    callback = LogixCallback(config, project="trainer", queries=items[:3], progress=False)
    Trainer(model=model, args=args, train_dataset=items, data_collator=collate, callbacks=[callback]).train()
    d = Dist.current()
    (out / f"rank-{d.rank}.json").write_text(json.dumps({"world": d.world_size, "rank": d.rank}))


def main() -> None:
    task, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    opts = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    if task == "trainer":  # the Trainer (accelerate) sets up the process group itself
        trainer_task(root, out, opts)
        return
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    d = Dist.current()
    record = {"rank": d.rank, "world": d.world_size}
    try:
        if task in ("log", "crash"):
            run = log_run(opts, root, kill_rank=1 if task == "crash" else None)
            if opts.get("score", True):
                score(run.dir, out, opts)
        elif task == "score":
            score(Path(opts["run"]), out, opts)
        elif task == "dup":
            for policy in ("error", "skip"):
                model = TokenLM()
                cfg = {**opts["config"], "store": {"duplicate_ids": policy, "shard_rows": 4}}
                run = logix.init(policy, config=cfg, root=root)
                run.watch(model)
                overlap = range(0, 8) if d.rank == 0 else range(5, 12)  # ids 5..7 on both ranks
                try:
                    log_examples(run, model, "ex", 12, 3, 1, overlap)
                    run.finalize()
                    record[policy] = None
                except logix.LogixError as exc:
                    record[policy] = f"{type(exc).__name__}: {exc}"
    finally:
        (out / f"rank-{d.rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # as logix.cli does under a launcher: leave without the interpreter's teardown, which can abort
    # in torch's C++ threads on a loaded machine after the group was destroyed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

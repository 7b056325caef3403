"""Multi-process scaling: scoring and logging with 1 and 2 processes on the same data.

Both phases run under ``torchrun`` (gloo on CPU, NCCL with ``--cuda``); each timing is taken
inside the workers between two barriers, so process start-up and imports are excluded.

* **Scoring**: :func:`logix.analysis.sharded.sharded_influence` of ``--n-query`` queries against
  a synthetic store (the layout of ``bench_influence.py``: 12 modules of 16x16 blocks, dim
  3072, float32, cached in ``--cache``), ``kfac`` preconditioner, top-10, self-influence, a
  fresh work dir per call. Throughput in pairs/s = n_query * n_train / seconds.
* **Logging**: a seeded GPT-2 (``--layers`` x ``--width``) logs ``--n-log`` sequences of
  ``--seq`` tokens (random projection k=16 per side, KFAC statistics in the log pass) with
  ``with run(...)`` around a summed loss, each process its own share
  (``logix.core.distributed.shard_indices``). Throughput in examples/s.

Configurations, in interleaved rounds (a shared machine's load hits all alike), medians:
``1p x 1t`` (one process, one thread), ``2p x 1t`` (two processes, one thread each: the
distributed path) and ``1p x 2t`` (one process with both threads: what a user without
distribution gets on the same cores). The scaling ratio is ``2p x 1t`` over ``1p x 1t``.

    python benchmarks/bench_distributed.py            # full run (~4 min on 2 cores)
    python benchmarks/bench_distributed.py --quick    # smoke run
    python benchmarks/bench_distributed.py --cuda --n-train 2000000 --layers 24 --width 1024   # GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_distributed.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "logix-bench-distributed"
CONFIGS = [("1p x 1t", 1, 1), ("2p x 1t", 2, 1), ("1p x 2t", 1, 2)]


# ---- workers (one rank each, under torchrun) --------------------------------------------------
def _init(args) -> tuple:
    import torch.distributed as dist

    from logix.core.distributed import Dist, init_from_launcher

    torch.set_num_threads(args.threads)
    if args.cuda:
        init_from_launcher("nccl")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_from_launcher("gloo")
    return Dist.current(), dist


def score_worker(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_influence import build_store, make_queries, make_statistics

    from logix.analysis import Checkpoint, Preconditioner
    from logix.analysis.sharded import sharded_influence

    d, _ = _init(args)
    store = build_store(Path(args.cache), args.n_train)  # built by the parent beforehand
    store.read_all() if args.warm else None
    cp = Checkpoint(store, make_queries(args.n_query), Preconditioner("kfac", make_statistics(args.n_train), store.layout))
    work = Path(args.work)
    d.barrier()
    start = time.perf_counter()
    sharded_influence(cp, work, top_k=10, part_rows=args.part_rows, progress=False, overwrite=True)
    d.barrier()
    seconds = time.perf_counter() - start
    if d.is_main:
        print(json.dumps({"seconds": seconds}))


def log_worker(args) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    import logix
    from logix.core.distributed import shard_indices

    hf_logging.set_verbosity_error()
    d, _ = _init(args)
    device = torch.device("cuda", torch.cuda.current_device()) if args.cuda else torch.device("cpu")
    torch.manual_seed(0)
    vocab = 512
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
                                       vocab_size=vocab, n_positions=args.seq)).to(device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = model.to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.n_log, args.seq), generator=gen)
    cfg = {"root": args.work, "projection": {"type": "random", "rank_in": 16, "rank_out": 16},
           "statistics": {"kfac": True}, "store": {"shard_rows": 256}}
    run = logix.init("log", config=cfg, overwrite=True)
    run.watch(model)
    mine = list(shard_indices(args.n_log, d.rank, d.world_size))
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    d.barrier()
    start = time.perf_counter()
    for lo in range(0, len(mine), args.batch):
        idx = mine[lo : lo + args.batch]
        batch = tokens[idx].to(device)
        with run(data_id=idx):
            logits = model(input_ids=batch).logits.float()
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                              reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    run.finalize()
    d.barrier()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.cuda else None
    if d.is_main:
        print(json.dumps({"seconds": seconds, "peak_gpu_gib": peak,
                          "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))


# ---- driver ----------------------------------------------------------------------------------------
def launch(task: str, nproc: int, threads: int, args, work: Path) -> dict:
    if work.exists():
        shutil.rmtree(work)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", task, "--threads", str(threads), "--work", str(work),
           "--cache", str(args.cache), "--n-train", str(args.n_train), "--n-query", str(args.n_query),
           "--part-rows", str(args.part_rows), "--n-log", str(args.n_log), "--seq", str(args.seq),
           "--batch", str(args.batch), "--layers", str(args.layers), "--width", str(args.width)]
    cmd += ["--cuda"] * args.cuda + ["--bf16"] * args.bf16 + ["--warm"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} {nproc}p x {threads}t failed:\n{proc.stderr[-4000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-query", type=int, default=64)
    p.add_argument("--part-rows", type=int, default=4096)
    p.add_argument("--n-log", type=int, default=384)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--cuda", action="store_true", help="NCCL, one GPU per process")
    p.add_argument("--bf16", action="store_true", help="log a bfloat16 model")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", choices=["score", "log"], help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        (score_worker if args.worker == "score" else log_worker)(args)
        return
    if args.quick:
        args.rounds, args.n_train, args.n_log = 1, 8_000, 64
        args.out = args.cache / "bench_distributed-quick.json"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_influence import build_store

    build_store(args.cache, args.n_train)
    configs = CONFIGS if not args.cuda else [("1 GPU", 1, 1), ("2 GPUs", 2, 1)]
    results: dict = {"setup": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                               if k not in ("worker", "threads", "work", "warm")},
                     "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
                     "score": {}, "log": {}}
    for task in ("score", "log"):
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        extra: dict[str, dict] = {}
        for r in range(args.rounds):
            for name, nproc, threads in configs:
                out = launch(task, nproc, threads, args, args.cache / f"work-{task}")
                times[name].append(out["seconds"])
                extra[name] = out
                print(f"round {r + 1}/{args.rounds} {task:5s} {name}: {out['seconds']:.2f} s", flush=True)
        work = args.n_query * args.n_train if task == "score" else args.n_log
        base = configs[0][0]
        for name, _, _ in configs:
            ts = times[name]
            results[task][name] = {
                "seconds": ts, "median_s": median(ts), "per_s": work / median(ts),
                "vs_" + base.replace(" ", ""): median(b / t for b, t in zip(times[base], ts)),
                **{k: v for k, v in extra[name].items() if k != "seconds"},
            }
    report(results, configs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


def report(results: dict, configs) -> None:
    s = results["setup"]
    base = configs[0][0]
    key = "vs_" + base.replace(" ", "")
    print(f"\nscoring: {s['n_query']} queries x {s['n_train']} rows (dim 3072, kfac, top-10, self-influence); "
          f"logging: {s['n_log']} x {s['seq']} tokens, GPT-2 {s['layers']}x{s['width']}, k=16")
    print(f"{'phase':8s} {'config':10s} {'median s':>9s} {'throughput':>16s} {'vs ' + base:>12s}")
    for task, unit in (("score", "pairs/s"), ("log", "examples/s")):
        for name, _, _ in configs:
            r = results[task][name]
            print(f"{task:8s} {name:10s} {r['median_s']:9.2f} {r['per_s']:>10.4g} {unit:5s} {r[key]:11.2f}x")


if __name__ == "__main__":
    main()

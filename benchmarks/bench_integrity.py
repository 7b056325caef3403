"""What the integrity checks cost: writing shards (hashing each committed shard) and scoring
(hashing each shard's ids and rows before first use), against the same work with the checks
replaced by no-ops, interleaved, on one store.

Rows: seeded Gaussian float32 rows of ``--dim`` values (default 4,096: a k=16 LoGra row of a
16-module model), shards of 2,048 rows (the default ``store.shard_rows``), ``--rows`` rows.

* **write**: ``ShardWriter.submit`` of every shard + ``close`` (HDF5 write, fsync, rename,
  manifest), with and without ``shard_digest`` (the xxh3-128 hashes of each shard's rows and of
  its other bytes).
* **capture**: logix capture (k=16, KFAC statistics, rows to the store, ``finalize`` included) of
  the tiny GPT-2 of ``bench_capture.py``, ``--capture-steps`` batches of 8, with and without the
  writer's hashes, in alternating rounds: the hashes run in the writer's background thread.
* **score**: a fresh ``Store`` and ``compute_influence`` (identity preconditioner, 64 queries,
  top-10), with and without the reader's checks (sizes on open, ids/header hashes, row hashes),
  store in the page cache. A fresh Store checks each shard once, so this is the worst case: a
  scorer that reuses its Store pays the check once per process.

    python benchmarks/bench_integrity.py                # 100,000 rows x 4,096 (1.6 GB), ~3 min here
    python benchmarks/bench_integrity.py --rows 20000 --capture-steps 10   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import logix.store.reader as reader
import logix.store.writer as writer_module
from logix.analysis import Checkpoint, compute_influence
from logix.analysis.precondition import Preconditioner
from logix.store import Layout, ShardWriter, Store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_capture's model and batches


@contextmanager
def checks(enabled: bool):
    """The checks as shipped, or replaced by no-ops (timing only: such a store does not verify)."""
    saved = writer_module.shard_digest, reader.Store._check
    if not enabled:
        fake = {"bytes": 0, "data": None, "xxh3_meta": "0", "xxh3_data": "0"}
        writer_module.shard_digest = lambda path: {**fake, "bytes": os.path.getsize(path)}
        reader.Store._check = lambda self, s, rows=False: None
    try:
        yield
    finally:
        writer_module.shard_digest, reader.Store._check = saved


def write(directory: Path, layout: Layout, rows: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    w = ShardWriter(directory, layout, "float32", per_token=False)
    w.set_id_type("int")
    at = 0
    for r in rows:
        w.submit(r, list(range(at, at + r.shape[0])))
        at += r.shape[0]
    w.close()
    return time.perf_counter() - t


def score(directory: Path, queries: torch.Tensor) -> float:
    t = time.perf_counter()
    store = Store(directory)
    cp = Checkpoint(store, queries, Preconditioner("identity", None, store.layout))
    compute_influence([cp], top_k=10, self_influence=False, progress=False)
    return time.perf_counter() - t


def capture(steps: int, enabled: bool, root: Path, tag: str) -> float:
    """Seconds for ``steps`` logged batches of the bench_capture model (finalize included)."""
    import bench_capture as bc

    import logix

    model = bc.build_model()
    batches = [bc.make_batch(s) for s in range(steps)]
    config = {"projection": {"type": "random", "rank_in": 16, "rank_out": 16}, "statistics": {"kfac": True},
              "store": {"shard_rows": 64}}
    with checks(enabled):
        run = logix.init(tag, config=config, root=root)
        run.watch(model)
        t = time.perf_counter()
        for b in batches:
            with run(data_id=b["data_id"], mask=b["attention_mask"]):
                model.zero_grad(set_to_none=True)
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                bc.summed_loss(logits, b["labels"]).backward()
        run.finalize()
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--capture-steps", type=int, default=40, help="0 skips the capture timing")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_integrity.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    layout = Layout.build([(f"m{i}", "linear", (16, 16)) for i in range(args.dim // 256)])
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randn(min(2048, args.rows - lo), layout.dim, generator=gen) for lo in range(0, args.rows, 2048)]
    queries = torch.randn(64, layout.dim, generator=gen)
    times: dict[str, list[float]] = {k: [] for k in ("write on", "write off", "score on", "score off",
                                                      "capture on", "capture off")}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for r in range(args.repeats):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                label = "on" if on else "off"
                directory = Path(tmp) / f"{label}-{r}"
                with checks(on):
                    times[f"write {label}"].append(write(directory, layout, rows))
            shutil.rmtree(Path(tmp) / f"off-{r}")
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                label = "on" if on else "off"
                with checks(on):  # both score the store written with checks (the off run skips them)
                    score(Path(tmp) / f"on-{r}", queries)  # warm the page cache
                    times[f"score {label}"].append(score(Path(tmp) / f"on-{r}", queries))
            shutil.rmtree(Path(tmp) / f"on-{r}")
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                if args.capture_steps:
                    label = "on" if on else "off"
                    times[f"capture {label}"].append(capture(args.capture_steps, on, Path(tmp), f"{label}-{r}"))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    gb = args.rows * layout.dim * 4 / 1e9
    table = [
        ("write", med["write off"], med["write on"]),
        ("score", med["score off"], med["score on"]),
    ]
    if args.capture_steps:
        table.append(("capture", med["capture off"], med["capture on"]))
    print(f"{args.rows:,} rows x {layout.dim:,} float32 ({gb:.2f} GB), shards of 2,048 rows, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'':8}{'no checks (s)':>15}{'checks (s)':>12}{'cost':>9}")
    for name, off, on in table:
        print(f"{name:8}{off:>15.2f}{on:>12.2f}{(on / off - 1) * 100:>8.1f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": args.rows, "dim": layout.dim, "times": times, "median": med,
                                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Top-k through the index against the exact scan, at scale.

Two stores, each written through the normal store (``ShardWriter``, checksummed shards):

* ``synthetic``: ``--rows`` (default 1,000,000) rows of ``--dim`` (256) float32 values, gradient-like:
  each row is one of 1,024 directions (norms spread over two decades, as per-example gradient norms
  are) plus isotropic noise;
* ``captured``: ``--captured`` (default 1,000,000) rows logged by ``logix`` from a small MLP
  classifier (LoGra k=16 on its two layers, ``store.shard_rows`` 8,192): fitted to seeded
  ``make_classification`` data (``cap-class``), and untrained on random data (``cap-rando``, rows
  without structure: the worst case of an inverted file).

For each store: the exact scan (``compute_influence``, identity preconditioner, top-100), then
``logix index`` kinds with their defaults (and the ``nprobe`` / ``rerank`` given), each searched with
``--queries`` (1,000) query rows: build time, index bytes per row and as a share of the float32
rows, query latency (one batch of queries) and throughput, recall@10 and @100 against the exact
scan, and the build's peak memory above the process's baseline (RSS sampled every 50 ms). A
table extrapolates memory, disk and build time to 100M rows.

    python benchmarks/bench_index.py                      # ~10 min on 2 cores
    python benchmarks/bench_index.py --rows 100000 --captured 20000 --queries 200   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from torch import nn

import logix
from logix.analysis import Index, compute_influence
from logix.analysis.influence import Checkpoint
from logix.analysis.precondition import Preconditioner
from logix.store import Layout, ShardWriter, Store
from logix.store.rundir import store_dir

HERE = Path(__file__).resolve().parent


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 50 ms."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.base, self.peak, self._stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above_base_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def synthetic_store(run_dir: Path, n: int, dim: int, seed: int = 0) -> Store:
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(1024, dim, generator=gen)
    directions *= (torch.logspace(0, 2, 1024) / directions.norm(dim=1))[:, None]
    layout = Layout.build([("synthetic", "linear", (16, dim // 16))])
    writer = ShardWriter(store_dir(run_dir), layout, "float32", False)
    writer.set_id_type("int")
    for lo in range(0, n, 8192):
        m = min(8192, n - lo)
        pick = torch.randint(0, 1024, (m,), generator=gen)
        rows = directions[pick] * (0.5 + torch.rand(m, 1, generator=gen)) + torch.randn(m, dim, generator=gen)
        writer.submit(rows, list(range(lo, lo + m)))
    writer.close()
    return Store(store_dir(run_dir))


def captured_store(root: Path, n: int, data: str = "classification", seed: int = 0) -> Store:
    """Rows logged by logix (LoGra k=16, float32) from a seeded MLP classifier: ``classification``:
    fitted for 3 epochs to ``sklearn.datasets.make_classification`` data (10 classes, 2 clusters
    each), its gradients then logged over all ``n`` examples; ``random``: untrained, on random
    inputs and labels (rows without structure, the worst case of an inverted file)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    if data == "classification":
        from sklearn.datasets import make_classification

        xs, ys = make_classification(n_samples=n, n_features=64, n_informative=24, n_classes=10,
                                     n_clusters_per_class=2, class_sep=1.5, flip_y=0.02, random_state=seed)
        xs, ys = torch.tensor(xs, dtype=torch.float32), torch.tensor(ys)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(3):
            for batch in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(256):
                opt.zero_grad()
                nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
                opt.step()
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        xs, ys = torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    run = logix.init("captured", config={"projection": {"type": "random", "rank_in": 16, "rank_out": 16},
                                         "statistics": {"kfac": False},
                                         "store": {"shard_rows": 8192, "dtype": "float32"}},
                     root=root, overwrite=True)
    run.watch(model)
    for lo in range(0, n, 1024):
        with run(data_id=list(range(lo, min(n, lo + 1024)))):
            nn.functional.cross_entropy(model(xs[lo : lo + 1024]), ys[lo : lo + 1024], reduction="sum").backward()
    return run.finalize()


def queries_like(store: Store, n: int, seed: int = 1) -> torch.Tensor:
    """Query rows: other rows of the same distribution (rows of the store, perturbed)."""
    pick = np.sort(np.random.default_rng(seed).choice(store.n_rows, n, replace=False))
    rows = store.take(pick)
    return rows + 0.3 * rows.std() * torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))


def exact_top(store: Store, queries: torch.Tensor, k: int) -> tuple[np.ndarray, float]:
    cp = Checkpoint(store, queries, Preconditioner("identity", None, store.layout))
    start = time.perf_counter()
    result = compute_influence(cp, top_k=k, self_influence=False, progress=False)
    return result.top_index.numpy(), time.perf_counter() - start


def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(e[:k])) / k for f, e in zip(found, exact)]))


def bench_store(name: str, run_dir: Path, store: Store, queries: torch.Tensor, settings: list[dict]) -> list[dict]:
    exact, exact_s = exact_top(store, queries, 100)
    rows_bytes = store.n_rows * store.dim * 4
    out = [{"store": name, "kind": "exact scan", "rows": store.n_rows, "dim": store.dim, "search_s": exact_s,
            "queries_per_s": len(queries) / exact_s, "recall@10": 1.0, "recall@100": 1.0,
            "bytes_per_row": store.dim * 4, "share_of_rows": 1.0}]
    for s in settings:
        with PeakRSS() as mem:
            start = time.perf_counter()
            build = {k: store.dim // 4 if v == "dim/4" else v for k, v in s.get("build", {}).items()}
            index = Index.build(run_dir, kind=s["kind"], mode="dot", preconditioner="identity", progress=False, **build)
            build_s = time.perf_counter() - start
        for search in s["searches"]:  # one build, searched with each setting
            index.search(queries[:10], 10, "identity", **search)  # warm-up (maps the file)
            start = time.perf_counter()
            hits = index.search(queries, 100, "identity", **search)
            search_s = time.perf_counter() - start
            start = time.perf_counter()
            hits10 = index.search(queries, 10, "identity", **search)
            search10_s = time.perf_counter() - start
            label = " ".join([s["kind"]] + [f"{k}{v}" for k, v in build.items()]
                             + [f"{k.replace('rerank', 'rr')}{v}" for k, v in search.items()])
            out.append({"store": name, "kind": label, "rows": store.n_rows, "dim": store.dim, "build_s": build_s,
                        "train_s": index.meta.get("train_s", 0.0), "params": index.meta["params"], "build": build,
                        "search": search,
                        "search_s": search10_s, "queries_per_s": len(queries) / search10_s,
                        "search_top100_s": search_s, "speedup_vs_exact": exact_s / search10_s,
                        "recall@10": recall(hits10.index.numpy(), exact, 10),
                        "recall@100": recall(hits.index.numpy(), exact, 100),
                        "bytes_per_row": index.nbytes / store.n_rows, "share_of_rows": index.nbytes / rows_bytes,
                        "build_peak_mb_above_base": mem.above_base_mb, "index_mb": index.nbytes / 2**20})
            print(_row(out[-1]), flush=True)
    print(_row(out[0]), flush=True)
    return out


def _row(r: dict) -> str:
    return (f"{r['store']:<10}{r['kind']:<28}{r['rows']:>10,}{r.get('build_s', 0):>9.1f}{r['bytes_per_row']:>9.1f}"
            f"{r['share_of_rows']:>8.3f}{r['queries_per_s']:>10.0f}{r.get('speedup_vs_exact', 1):>8.1f}"
            f"{r['recall@10']:>8.3f}{r['recall@100']:>9.3f}{r.get('build_peak_mb_above_base', 0):>9.0f}")


def extrapolate(results: list[dict], target: int = 100_000_000) -> list[dict]:
    """Memory, disk and build time at ``target`` rows from the measured per-row figures (build time:
    the fixed-size training set's, plus the add passes scaled linearly)."""
    out = []
    for r in results:
        if r["kind"] == "exact scan":
            continue
        scale = target / r["rows"]
        out.append({"store": r["store"], "kind": r["kind"], "rows": target, "index_gb": r["bytes_per_row"] * target / 1e9,
                    "rows_gb": r["dim"] * 4 * target / 1e9,
                    "build_h": (r["train_s"] + (r["build_s"] - r["train_s"]) * scale) / 3600})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (0: none)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--captured", type=int, default=1_000_000, help="captured rows per --captured-data")
    parser.add_argument("--captured-data", nargs="+", default=["classification", "random"],
                        choices=["classification", "random"], help="the captured stores' data (see captured_store)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", help="only these index kinds (default: all)")
    parser.add_argument("--hnsw", action="store_true", help="also hnsw over float32 rows (more memory than the rows)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "bench_index.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    settings = [
        {"kind": "ivfsq8", "searches": [{"nprobe": 16, "rerank": 10}]},
        {"kind": "ivfpq", "searches": [{"nprobe": 16, "rerank": 5}, {"nprobe": 16, "rerank": 10},
                                       {"nprobe": 64, "rerank": 10}]},
        {"kind": "hnswsq4", "searches": [{"rerank": 10}, {"rerank": 20}]},
        {"kind": "hnswsq4", "build": {"reduce": "dim/4"}, "searches": [{"rerank": 10}, {"rerank": 20}]},
    ]
    if args.hnsw:
        settings.append({"kind": "hnsw", "searches": [{"rerank": 10}]})
    settings = [s for s in settings if s["kind"] in (args.kinds or [s["kind"]])]
    print(f"{'store':<10}{'kind':<28}{'rows':>10}{'build s':>9}{'B/row':>9}{'share':>8}{'q/s':>10}{'x exact':>8}"
          f"{'R@10':>8}{'R@100':>9}{'peak MB':>9}")
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        if args.rows:
            run_dir = Path(tmp) / "synthetic"
            store = synthetic_store(run_dir, args.rows, args.dim)
            results += bench_store("synthetic", run_dir, store, queries_like(store, args.queries), settings)
        for data in args.captured_data if args.captured else []:
            store = captured_store(Path(tmp) / data, args.captured, data)
            results += bench_store(f"cap-{data[:5]}", store.directory.parents[1], store,
                                   queries_like(store, min(args.queries, store.n_rows // 10)), settings)
    table = extrapolate(results)
    print("\nextrapolated to 100M rows:")
    for r in table:
        print(f"  {r['store']:<10}{r['kind']:<28} index {r['index_gb']:.1f} GB (float32 rows {r['rows_gb']:.0f} GB), "
              f"build {r['build_h']:.1f} h on this machine")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "extrapolated": table, "args": vars(args) | {"out": str(args.out)},
                                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

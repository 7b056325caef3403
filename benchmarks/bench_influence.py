"""Scoring throughput and peak memory of ``compute_influence`` versus a plain in-memory matmul.

Synthetic stores written with ``logix.store.ShardWriter`` (no model): the layout of a small LM
logged at k=16 (12 modules of (16, 16) blocks, dim 3072), float32 rows, shards of 1024 rows
(logix's default), ``n_train`` in {10k, 100k}, ``n_query`` queries. Stores are cached in
``--cache`` and reused. KFAC/EK-FAC statistics are random but well-formed (SPD factors).

Throughput, in pairs/s = n_query * n_train / seconds, with the store in the page cache (read
once before timing). Methods, timed in interleaved rounds (A, B, C, A, B, C, ...) so that the
load of a shared machine hits all of them alike; each method's median is reported, and its
ratio to ``mm32`` is the median of the per-round ratios:

* ``mm32`` / ``mm64``  ``queries @ train.T`` of in-memory float32 / float64 tensors (the target);
* ``read``             ``Store.iter_chunks`` as ``compute_influence`` reads (its chunk size, chunks spanning
                       shards, read into reused buffers), no math;
* ``read-aligned``     the same with ``align_to_shards=True`` (zero-copy memory maps of the shards);
* ``<pre>[-self][-f64]`` ``compute_influence(top_k=10)`` with the ``identity`` or ``kfac``
  preconditioner, self-influence on/off, ``dtype=float64`` GEMM for ``-f64``.

Peak memory: each logix configuration runs again alone in a subprocess (``--worker``), which
reports its RSS before the call and its peak RSS (VmHWM) during it, at the same ``--budget-mb``.
``--memory-n-train`` adds store sizes measured for memory only (no throughput): a 10k-row store
is only ~4 chunks, too few to fill the prefetch pipeline, so flatness is judged from 30k to 300k.
At every size the ``MEMORY_ONLY`` configurations are also measured with glibc's mmap threshold
fixed (``MALLOC_MMAP_THRESHOLD_``, ``memory_fixed_mmap``): the difference is heap fragmentation.

    python benchmarks/bench_influence.py            # full run (~8 min on 2 cores, 5.4 GB cache)
    python benchmarks/bench_influence.py --quick    # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

import logix
from logix.analysis import Checkpoint, Preconditioner, compute_influence
from logix.analysis.kernels import budget_chunk_rows
from logix.core.statistics import Statistics, eigendecompose
from logix.store import Layout, ShardWriter, Store

MODULES, K, SHARD_ROWS, TOP_K = 12, 16, 1024, 10
LAYOUT = Layout.build([(f"h.{i}.mlp", "linear", (K, K)) for i in range(MODULES)])
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_influence.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "logix-bench-influence"
# name -> (preconditioner, self_influence, score dtype)
LOGIX = {
    "identity": ("identity", False, torch.float32),
    "identity-self": ("identity", True, torch.float32),
    "identity-f64": ("identity", False, torch.float64),
    "kfac": ("kfac", False, torch.float32),
    "kfac-self": ("kfac", True, torch.float32),
}
MEMORY_ONLY = ("identity", "identity-self", "kfac-self")  # measured at the --memory-n-train sizes
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}  # glibc: no dynamic threshold, >= 1 MiB is mmapped


def build_store(cache: Path, n_train: int) -> Store:
    """The cached store of ``n_train`` random rows (written once)."""
    directory = cache / f"train-{n_train}x{LAYOUT.dim}"
    try:
        store = Store(directory)
        if store.n_rows == n_train and store.dim == LAYOUT.dim:
            return store
    except logix.LogixError:
        pass
    for old in directory.glob("*") if directory.exists() else []:
        old.unlink()
    writer = ShardWriter(directory, LAYOUT, "float32", per_token=False)
    writer.set_id_type("int")
    gen = torch.Generator().manual_seed(n_train)
    for lo in range(0, n_train, SHARD_ROWS):
        n = min(SHARD_ROWS, n_train - lo)
        scale = torch.empty(n, 1).log_normal_(0.0, 1.0, generator=gen)  # per-example loss scale
        writer.submit(torch.randn(n, LAYOUT.dim, generator=gen) * scale, list(range(lo, lo + n)))
    writer.close()
    return Store(directory)


def make_statistics(n_train: int, tokens_per_example: int = 128) -> Statistics:
    """Plausible KFAC/EK-FAC statistics: SPD factors with decaying spectra, positive corrections."""
    stats, gen = Statistics(), torch.Generator().manual_seed(0)
    tokens = n_train * tokens_per_example
    for block in LAYOUT.blocks:
        for key in ("A", "S"):
            f = torch.randn(K, K, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, K, dtype=torch.float64)
            stats.add(block.name, key, (f @ f.T + 1e-4 * torch.eye(K, dtype=torch.float64)) * tokens)
        stats.add(block.name, "ekfac", torch.rand(K, K, generator=gen, dtype=torch.float64) * n_train)
        stats.add(block.name, "tokens", tokens)
        stats.add(block.name, "examples", n_train)
    eigendecompose(stats, LAYOUT.names)
    stats.freeze()
    return stats


def make_queries(n_query: int) -> torch.Tensor:
    return torch.randn(n_query, LAYOUT.dim, generator=torch.Generator().manual_seed(1))


def logix_call(store: Store, queries: torch.Tensor, name: str, budget_mb: float, stats: Statistics):
    pre_kind, self_inf, dtype = LOGIX[name]
    cp = Checkpoint(store, queries, Preconditioner(pre_kind, stats, store.layout))
    return lambda: compute_influence(cp, top_k=TOP_K, memory_budget_mb=budget_mb, self_influence=self_inf,
                                     progress=False, dtype=dtype)


def chunk_rows(n_query: int, budget_mb: float) -> int:
    """The chunk size compute_influence picks (mirrors its formula; used by ``read`` only)."""
    batch = min(n_query, max(1, int(budget_mb * 2**20 / 2 // (LAYOUT.dim * 16))))
    return budget_chunk_rows(LAYOUT.dim, batch, budget_mb / 2, 2)


def time_throughput(store: Store, n_query: int, budget_mb: float, rounds: int, stats: Statistics) -> dict:
    """Interleaved rounds of every method on one store; medians, per-round ratios to mm32."""
    queries = make_queries(n_query)
    train32 = store.read_all()  # also puts the store in the page cache
    train64, q64 = train32.double(), queries.double()
    rows = chunk_rows(n_query, budget_mb)
    methods = {
        "mm32": lambda: torch.matmul(queries, train32.T),
        "mm64": lambda: torch.matmul(q64, train64.T),
        "read": lambda: sum(c.rows.shape[0] for c in store.iter_chunks(rows)),
        "read-aligned": lambda: sum(c.rows.shape[0] for c in store.iter_chunks(rows, align_to_shards=True)),
        **{name: logix_call(store, queries, name, budget_mb, stats) for name in LOGIX},
    }
    for fn in methods.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    pairs = n_query * len(store)
    out = {}
    for name, ts in times.items():
        ratio = median(m / t for m, t in zip(times["mm32"], ts))
        out[name] = {"seconds": ts, "median_s": median(ts), "pairs_per_s": pairs / median(ts), "vs_mm32": ratio}
    return out


def profile(store: Store, n_query: int, budget_mb: float, stats: Statistics, name: str, top: int = 12) -> list:
    """cProfile of one call (main thread only: the prefetch thread's reads show as queue waits)."""
    fn = logix_call(store, make_queries(n_query), name, budget_mb, stats)
    prof = cProfile.Profile()
    prof.runcall(fn)
    st = pstats.Stats(prof)
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"function": f"{Path(f).name}:{line}({fn_name})", "calls": nc, "tottime_s": round(tt, 3),
             "cumtime_s": round(ct, 3), "share": round(tt / total, 3)}
            for (f, line, fn_name), (_, nc, tt, ct, _) in rows]


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident memory of this process; Linux."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(field + ":"))


def worker(args: argparse.Namespace) -> None:
    """One logix configuration alone in this process; prints its memory as JSON.

    Peak = VmHWM, reset just before the call. Not ``ru_maxrss``: Linux carries the parent's
    high-water mark over fork+exec, so a child of a process holding the in-memory train
    tensors would report those."""
    store = Store(args.store)
    fn = logix_call(store, make_queries(args.n_query), args.worker, args.budget_mb, make_statistics(len(store)))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    before = rss_mb()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = rss_mb("VmHWM")
    print(json.dumps({"rss_before_mb": before, "peak_rss_mb": peak, "delta_mb": peak - before, "seconds": seconds}))


def measure_memory(store: Store, name: str, n_query: int, budget_mb: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--store", str(store.directory),
           "--n-query", str(n_query), "--budget-mb", str(budget_mb)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small stores, 1 round, 2 memory workers (< 1 min)")
    p.add_argument("--n-train", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--memory-n-train", type=int, nargs="*", default=[30_000, 300_000],
                   help="extra store sizes measured for peak memory only")
    p.add_argument("--n-query", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-mb", type=float, default=512.0, help="compute_influence memory_budget_mb")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the stores are written once")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", choices=list(LOGIX), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    memory_names = list(LOGIX)
    if args.quick:  # results go to the cache, not over the full run's
        args.n_train, args.rounds, memory_names = [2_000, 10_000], 1, ["identity", "identity-self"]
        args.memory_n_train = []
        args.out = args.cache / "bench_influence-quick.json"
    setup = {"dim": LAYOUT.dim, "modules": MODULES, "block": [K, K], "store_dtype": "float32",
             "shard_rows": SHARD_ROWS, "n_query": args.n_query, "top_k": TOP_K, "budget_mb": args.budget_mb,
             "chunk_rows": chunk_rows(args.n_query, args.budget_mb), "rounds": args.rounds,
             "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "python": platform.python_version(), "platform": platform.platform(),
             "loadavg_before": os.getloadavg()}
    start = time.perf_counter()
    results: dict = {"setup": setup, "runs": {}, "memory_only": {}, "memory_fixed_mmap": {}}
    for n_train in args.n_train:
        store = build_store(args.cache, n_train)
        stats = make_statistics(n_train)
        run = results["runs"][str(n_train)] = {}
        run["throughput"] = time_throughput(store, args.n_query, args.budget_mb, args.rounds, stats)
        run["memory"] = {name: measure_memory(store, name, args.n_query, args.budget_mb) for name in memory_names}
        if n_train == max(args.n_train):
            run["profile"] = {name: profile(store, args.n_query, args.budget_mb, stats, name)
                              for name in ("identity-self", "kfac-self")}
    for n_train in sorted(set(args.n_train) | set(args.memory_n_train)):
        store = build_store(args.cache, n_train)
        if n_train not in args.n_train:
            results["memory_only"][str(n_train)] = {
                name: measure_memory(store, name, args.n_query, args.budget_mb) for name in MEMORY_ONLY
            }
        if not args.quick:
            results["memory_fixed_mmap"][str(n_train)] = {
                name: measure_memory(store, name, args.n_query, args.budget_mb, FIXED_MMAP) for name in MEMORY_ONLY
            }
    setup["loadavg_after"], setup["wall_s"] = os.getloadavg(), time.perf_counter() - start
    report(results, args.n_train)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def report(results: dict, sizes: list[int]) -> None:
    s = results["setup"]
    print(f"\nn_query={s['n_query']} dim={s['dim']} budget={s['budget_mb']:.0f}MB chunk_rows={s['chunk_rows']} "
          f"threads={s['threads']} rounds={s['rounds']}")
    print(f"{'method':<15}" + "".join(f"{f'n={n}: Mpairs/s  vs mm32  peakMB (+call)':>44}" for n in sizes))
    for name in results["runs"][str(sizes[0])]["throughput"]:
        line = f"{name:<15}"
        for n in sizes:
            run = results["runs"][str(n)]
            t, mem = run["throughput"][name], run["memory"].get(name)
            cell = f"{t['pairs_per_s'] / 1e6:10.2f} {t['vs_mm32']:8.2f}x"
            cell += f"{mem['peak_rss_mb']:9.0f} ({mem['delta_mb']:+6.0f})" if mem else " " * 18
            line += f"{cell:>44}"
        print(line)
    memory = {int(n): r["memory"] for n, r in results["runs"].items()} | {
        int(n): m for n, m in results["memory_only"].items()}
    print("\npeak RSS MB (+ growth during the call) by n_train:")
    print(f"{'method':<22}" + "".join(f"{n:>16}" for n in sorted(memory)))
    fixed = {int(n): m for n, m in results["memory_fixed_mmap"].items()}
    rows = [(name, memory) for name in LOGIX] + [(f"{name} [fixed]", fixed) for name in MEMORY_ONLY if fixed]
    for label, source in rows:
        cells = [source.get(n, {}).get(label.removesuffix(" [fixed]")) for n in sorted(memory)]
        print(f"{label:<22}" + "".join(f"{c['peak_rss_mb']:8.0f} ({c['delta_mb']:+5.0f})" if c else f"{'':>16}"
                                       for c in cells))
    for name, rows in results["runs"][str(max(sizes))].get("profile", {}).items():
        print(f"\ncProfile {name}, n_train={max(sizes)} (main thread; by own time):")
        for r in rows[:8]:
            print(f"  {r['tottime_s']:7.3f}s {r['share']:6.1%}  {r['calls']:6d}  {r['function']}")


if __name__ == "__main__":
    main()

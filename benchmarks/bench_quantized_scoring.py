"""Scoring time of quantized rows against float32 rows of the same bytes, on a large store.

``bench_lm_quality.py`` times scoring on 320 train rows, where fixed costs dominate. This script
writes synthetic stores (seeded Gaussian rows, shards of 2,048 rows) with the block layout of
that benchmark's tiny GPT-2 at two settings of about the same bytes per row:

* ``int4 52x52``: the whitened int4 setting of ``configs/lm_influence.yaml`` (16,272 dimensions,
  8,180 B per row with the scales);
* ``float32 8x24``: plain LoGra at that budget (2,112 dimensions, 8,448 B per row);

(and, for reference, ``float32 52x52``: the same dimensions as the int4 rows, 4x the bytes), and
times ``compute_influence`` (identity preconditioner, 64 queries, top-10, no self-influence)
over ``--rows`` rows, store in the page cache, interleaved repeats. Scoring costs one
multiply-add per stored dimension and query, so the int4 store cannot be faster than the
dimension ratio; dequantizing the codes adds a memory pass.

    python benchmarks/bench_quantized_scoring.py              # 50,000 rows, ~2 min here
    python benchmarks/bench_quantized_scoring.py --rows 5000  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from logix.analysis import Checkpoint, compute_influence
from logix.analysis.precondition import Preconditioner
from logix.store import Layout, ShardWriter, Store

HERE = Path(__file__).resolve().parent
# per-module block sizes (k_in * k_out, capped by each module's shape) of the tiny GPT-2 of
# bench_lm_quality.py: wte, wpe, then per layer c_attn, attn.c_proj, c_fc, mlp.c_proj, then lm_head
SETTINGS = {
    "int4 52x52": ("int4", [1664, 640, 1716, 1056, 1716, 1664, 1716, 1056, 1716, 1664, 1664]),
    "float32 8x24": ("float32", [192, 160, 192, 192, 192, 192, 192, 192, 192, 192, 224]),
    "float32 52x52": ("float32", [1664, 640, 1716, 1056, 1716, 1664, 1716, 1056, 1716, 1664, 1664]),
}


def write_store(directory: Path, dtype: str, sizes: list[int], n: int, shard: int = 2048) -> Store:
    layout = Layout.build([(f"m{i}", "linear", (1, s)) for i, s in enumerate(sizes)])
    writer = ShardWriter(directory, layout, dtype, per_token=False)
    writer.set_id_type("int")
    gen = torch.Generator().manual_seed(0)
    for lo in range(0, n, shard):
        rows = torch.randn(min(shard, n - lo), layout.dim, generator=gen)
        writer.submit(rows, list(range(lo, lo + rows.shape[0])))
    writer.close()
    return Store(directory)


def score_s(store: Store, queries: torch.Tensor) -> float:
    cp = Checkpoint(store, queries, Preconditioner("identity", None, store.layout))
    start = time.perf_counter()
    compute_influence(cp, top_k=10, progress=False, self_influence=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_quantized_scoring.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stores = {name: write_store(Path(tmp) / str(i), dtype, sizes, args.rows)
                  for i, (name, (dtype, sizes)) in enumerate(SETTINGS.items())}
        gen = torch.Generator().manual_seed(1)
        queries = {name: torch.randn(args.queries, s.dim, generator=gen) for name, s in stores.items()}
        for name, s in stores.items():  # warm: page cache, allocator
            score_s(s, queries[name])
        times: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(args.repeats):
            for name, s in stores.items():
                times[name].append(score_s(s, queries[name]))
        rows = []
        base = statistics.median(times["float32 8x24"])
        for name, s in stores.items():
            med = statistics.median(times[name])
            rows.append({"setting": name, "dims": s.dim, "bytes_per_row": s.nbytes() // s.n_rows, "score_s": med,
                         "all_s": times[name], "vs_float32_8x24": med / base,
                         "rows_per_s": args.rows / med})
    print(f"{'setting':<15} {'dims':>6} {'B/row':>6} {'score s':>8} {'vs f32 8x24':>12} {'rows/s':>9}")
    for r in rows:
        print(f"{r['setting']:<15} {r['dims']:>6} {r['bytes_per_row']:>6} {r['score_s']:>8.3f} "
              f"{r['vs_float32_8x24']:>11.1f}x {r['rows_per_s']:>9.0f}")
    report = {"rows": args.rows, "queries": args.queries, "results": rows, "threads": torch.get_num_threads(),
              "loadavg": os.getloadavg(), "torch": torch.__version__, "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Per-module raw covariance (``preconditioner="raw"``) against EK-FAC on the suite's tasks.

``raw`` preconditions each module's logged block with its whole covariance ``E[vec G vec G^T]``
(``statistics.raw: true``, accumulated in the logging pass); EK-FAC keeps only its diagonal in the
Kronecker eigenbasis. Measured on the default rows (orthogonal k=32, int8) and, where every block
fits ``--full-max-dim``, unprojected (``projection: none``, the modules kronfluence tracks). The
LDS protocol and the cached ground truth are ``bench_suite.py``'s; the default damping of ``raw``
is chosen on the tuning tasks (mlp, cnn) and reported on the others:

    python benchmarks/suite_raw.py            # ~15 min on 2 cores with the ground truth cached
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lds import RESULTS, ground_truth, log_config, score_matrix  # noqa: E402
from bench_suite import ALL_TASKS, FULL_TYPES, SEVEN, TUNING  # noqa: E402

import logix  # noqa: E402
from logix.analysis import lds  # noqa: E402

DAMPINGS = (0.01, 0.1, 0.3, 1.0, 2.0, 3.0, 10.0)  # relative


def settings(full_max_dim: int) -> dict[str, tuple[dict, list[str], bool]]:
    """label -> (logix config, preconditioners, full_dim)."""
    return {
        "default": ({"statistics": {"raw": True}}, ["ekfac", "raw"], False),
        "none": ({"projection": {"type": "none"}, "capture": {"types": FULL_TYPES},
                  "statistics": {"raw": True, "ekfac": True, "raw_max_dim": full_max_dim},
                  "store": {"dtype": "float32"}}, ["ekfac", "raw"], True),
    }


def run_task(name: str, args, tmp: Path) -> dict:
    task = ALL_TASKS[name]()
    n = task.n_train
    model = task.train(np.ones(n, dtype=bool), 0)
    masks, outputs, _ = ground_truth(f"suite-{name}", task.recipe, lambda m, s: task.outputs(task.train(m, s)),
                                     n, args.subsets)

    def loss_fn(ids, query, labels):
        return task.loss(model, ids, query, labels)

    rows = []
    for label, (config, pres, full_dim) in settings(args.full_max_dim).items():
        if task.modules:
            config = {**config, "capture": {**config.get("capture", {}), "modules": list(task.modules)}}
        start = time.perf_counter()
        try:
            run_dir = log_config(tmp, f"{name}-{label}", model, loss_fn, n, task.n_query, config)
        except logix.LogixError as exc:  # a block above raw_max_dim
            print(f"  {name} {label}: skipped ({str(exc)[:120]})", flush=True)
            continue
        log_s = time.perf_counter() - start
        for pre in pres:
            for d in DAMPINGS:
                start = time.perf_counter()
                value = lds(score_matrix(run_dir, pre, d, tmp), masks, outputs).mean
                rows.append({"rows": label, "preconditioner": pre, "damping": d, "lds": value, "full_dim": full_dim,
                             "log_s": log_s, "score_s": time.perf_counter() - start})
                print(f"  {name:<9}{label:<9}{pre:<7}{d:<6g}{value:.3f}", flush=True)
    return {"role": "tuning" if name in TUNING else "held-out", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=SEVEN, choices=list(ALL_TASKS))
    ap.add_argument("--subsets", type=int, default=64, help="half-subset retrainings (bench_suite's cache)")
    ap.add_argument("--full-max-dim", type=int, default=5000,
                    help="statistics.raw_max_dim of the unprojected runs (a block's covariance is dim^2 float64)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_suite-raw.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        with tempfile.TemporaryDirectory() as tmp:
            tasks[name] = run_task(name, args, Path(tmp))
        args.out.write_text(json.dumps({"tasks": tasks, "partial": True}, indent=1) + "\n")
    print(f"\n{'rows / preconditioner @ damping':<32}" + "".join(f"{n:>9}" for n in tasks))
    keys = sorted({(r["rows"], r["preconditioner"], r["damping"]) for t in tasks.values() for r in t["rows"]})
    for key in keys:
        cells = []
        for t in tasks.values():
            hit = [r["lds"] for r in t["rows"] if (r["rows"], r["preconditioner"], r["damping"]) == key]
            cells.append(f"{hit[0]:>9.3f}" if hit else f"{'-':>9}")
        print(f"{key[0] + ' ' + key[1] + ' @' + format(key[2], 'g'):<32}" + "".join(cells))
    report = {"tasks": tasks, "dampings": DAMPINGS, "wall_s": time.perf_counter() - start,
              "torch": torch.__version__, "platform": platform.platform()}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwall {report['wall_s']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()

"""Logs a small model into a run; the crash test kills it with SIGKILL mid-run.

Usage: python crash_worker.py ROOT PROJECT N_EXAMPLES SLEEP_S
"""

from __future__ import annotations

import sys
import time

import torch
from torch import nn

import logix


def main() -> None:
    root, project, n, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    cfg = {
        "projection": {"type": "random", "rank_in": 3, "rank_out": 2},
        "statistics": {"kfac": True, "raw": True},
        "store": {"shard_rows": 8},
    }
    run = logix.init(project, config=cfg, root=root)
    run.watch(model)
    for lo in range(0, n, 4):
        ids = [f"ex{i}" for i in range(lo, min(lo + 4, n))]
        if not run.pending(ids):
            continue
        with run(data_id=ids):
            idx = list(range(lo, min(lo + 4, n)))
            nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="sum").backward()
        print(f"batch {lo}", flush=True)
        time.sleep(sleep)
    run.finalize()
    print("done", flush=True)


if __name__ == "__main__":
    main()

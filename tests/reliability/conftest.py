"""A small finished run to damage: train rows in several shards, queries, KFAC statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import logix

CONFIG = {
    "projection": {"type": "random", "rank_in": 3, "rank_out": 2},
    "statistics": {"kfac": True},
    "store": {"shard_rows": 8},
}
N_TRAIN, N_QUERY = 32, 4


def data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def log_run(root: Path, project: str = "run", config: dict | None = None) -> Path:
    """Log N_TRAIN train rows (4 shards) and N_QUERY queries; return the run directory."""
    net = model()
    x, y = data(N_TRAIN, 1)
    run = logix.init(project, config=config or CONFIG, root=root)
    run.watch(net)
    for _ in run.plan():
        for lo in range(0, N_TRAIN, 4):
            with run(data_id=[f"ex{i}" for i in range(lo, lo + 4)]):
                nn.functional.cross_entropy(net(x[lo : lo + 4]), y[lo : lo + 4], reduction="sum").backward()
    run.finalize()
    qx, qy = data(N_QUERY, 2)
    with run.log_queries(data_id=[f"q{i}" for i in range(N_QUERY)]):
        nn.functional.cross_entropy(net(qx), qy, reduction="sum").backward()
    run.finalize()
    return run.dir


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return log_run(tmp_path / "root")

"""`logix inspect` reports what a run holds, and fails with one line on bad input."""

from __future__ import annotations

import torch
from torch import nn

import logix
from logix.cli import main


def test_inspect_run_and_store(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    run = logix.init("cli", config={"projection": {"rank_in": 2, "rank_out": 3}}, root=tmp_path)
    run.watch(model)
    with run(data_id=["x", "y", "z"]):
        model(torch.randn(3, 3)).sum().backward()
    run.finalize()
    assert main(["inspect", str(run.dir)]) == 0
    out = capsys.readouterr().out
    assert "store 'train': 3 rows in 1 shards, dtype float32, 12 values per row" in out
    assert "ids: x, y, z" in out and "(3, 2)" in out and "finalized: True" in out
    assert "statistics ['A', 'S', 'examples', 'tokens'] for 2 modules" in out
    assert main(["inspect", str(run.dir / "stores" / "train")]) == 0


def test_inspect_bad_directory_exits_nonzero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("logix: error:") and "not a logix run directory" in err

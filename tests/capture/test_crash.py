"""A run killed with SIGKILL keeps every committed shard and resumes to an exact result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import logix

WORKER = Path(__file__).resolve().parents[1] / "crash_worker.py"
N = 64


def _spawn(root: Path, project: str, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(root), project, str(N), str(sleep)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _committed_shards(store_dir: Path) -> int:
    try:
        return len(json.loads((store_dir / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    reference = _spawn(tmp_path, "reference", 0.0)
    assert reference.wait(timeout=120) == 0, reference.stderr.read()

    victim = _spawn(tmp_path, "victim", 0.15)
    store_dir = tmp_path / "victim" / "stores" / "train"
    deadline = time.time() + 60
    while _committed_shards(store_dir) < 2 and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    crashed = logix.load_store(store_dir)
    assert 2 <= crashed.n_shards and crashed.n_rows < N  # killed mid-run
    assert crashed.n_rows % 4 == 0  # whole batches only
    rows = crashed.read_all()  # every committed shard is readable
    assert rows.shape == (crashed.n_rows, crashed.dim) and torch.isfinite(rows).all()
    assert len(set(crashed.ids)) == crashed.n_rows

    resumed = _spawn(tmp_path, "victim", 0.0)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    final = logix.load_store(store_dir)
    ref = logix.load_store(tmp_path / "reference" / "stores" / "train")
    assert sorted(final.ids) == sorted(ref.ids) == sorted(f"ex{i}" for i in range(N))
    assert torch.allclose(final.get(ref.ids), ref.read_all(), atol=1e-6)
    # statistics after resume equal those of the uninterrupted run (no batch counted twice)
    got = logix.Statistics.load(tmp_path / "victim" / "statistics" / "log.safetensors")
    want = logix.Statistics.load(tmp_path / "reference" / "statistics" / "log.safetensors")
    assert got.flat().keys() == want.flat().keys()
    for key, value in want.flat().items():
        assert torch.allclose(got.flat()[key], value, rtol=1e-10, atol=1e-12), key

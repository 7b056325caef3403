"""One writer per run directory: a second process is refused naming the holder's pid; the lock of
a SIGKILLed process is taken over and the run resumes to the uninterrupted result."""

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
from logix.errors import RunDirectoryError
from logix.store import Layout, ShardWriter
from logix.store.rundir import run_file, store_dir

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "crash_worker.py"
N = 64


def _spawn(root: Path, project: str, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(WORKER), str(root), project, str(N), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    first = _spawn(tmp_path, "busy", 0.2)
    _wait_for(store_dir(tmp_path / "busy") / "manifest.json", first)
    with pytest.raises(RunDirectoryError, match=rf"being written by pid {first.pid} "):
        logix.init("busy", config={"projection": {"type": "random", "rank_in": 3, "rank_out": 2},
                                   "statistics": {"kfac": True, "raw": True}, "store": {"shard_rows": 8}},
                   root=tmp_path)
    second = _spawn(tmp_path, "busy", 0.0)  # a second process: refused, the first is undisturbed
    _, err = second.communicate(timeout=120)
    assert second.returncode != 0 and f"being written by pid {first.pid}" in err

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    resumed = _spawn(tmp_path, "busy", 0.0)  # the lock died with its process: taken over
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    reference = _spawn(tmp_path, "reference", 0.0)
    assert reference.wait(timeout=120) == 0
    got, want = logix.load_store(store_dir(tmp_path / "busy")), logix.load_store(store_dir(tmp_path / "reference"))
    assert sorted(got.ids) == sorted(want.ids) == sorted(f"ex{i}" for i in range(N))
    order = [got.index_of(i) for i in want.ids]
    torch.testing.assert_close(got.read_all()[order], want.read_all(), rtol=1e-6, atol=1e-7)
    assert json.loads(run_file(tmp_path / "busy").read_text())["finalized"]


def test_a_second_store_writer_in_another_process_is_refused(tmp_path):
    code = (
        "import sys, time; from logix.store import Layout, ShardWriter\n"
        "w = ShardWriter(sys.argv[1], Layout.build([('m', 'linear', (2, 3))]), 'float32', False)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(RunDirectoryError, match=rf"store {tmp_path} is being written by pid {holder.pid}"):
            ShardWriter(tmp_path, Layout.build([("m", "linear", (2, 3))]), "float32", False)
        # another rank's writer has its own lock and proceeds
        ShardWriter(tmp_path, Layout.build([("m", "linear", (2, 3))]), "float32", False, rank=1).close()
    finally:
        holder.kill()
        holder.wait()
    writer = ShardWriter(tmp_path, Layout.build([("m", "linear", (2, 3))]), "float32", False)  # taken over
    writer.close()


def test_init_twice_in_one_process_is_allowed(tmp_path):
    first = logix.init("p", root=tmp_path)
    second = logix.init("p", root=tmp_path)
    assert first.dir == second.dir

"""Multi-process logging and scoring (torch.distributed, gloo, 2 CPU processes).

Oracles: the same data logged by one process (same rows per id, same statistics, same
projections); the same store scored in one process by ``compute_influence`` (same top-k,
self-influence and full score matrix); a run whose rank was SIGKILLed keeps every committed
shard readable and, resumed, ends equal to the one-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import logix
from logix.analysis import compute_influence, load_checkpoint
from logix.core.statistics import Statistics
from logix.errors import StoreError
from logix.store import Store
from logix.store.format import read_rank_manifest

WORKER = Path(__file__).resolve().parents[1] / "dist_worker.py"
ROOT = Path(__file__).resolve().parents[2]

RANDOM_EKFAC = {"projection": {"type": "random", "rank_in": 3, "rank_out": 4},
                "statistics": {"kfac": True, "ekfac": True, "raw": True}, "store": {"shard_rows": 4}}
PCA_EKFAC = {"projection": {"type": "pca", "rank_in": 3, "rank_out": 4},
             "statistics": {"kfac": True, "ekfac": True}, "store": {"shard_rows": 5}}
CRASH = {"projection": {"type": "random", "rank_in": 3, "rank_out": 4},  # A, S, raw: sums compared to 1e-6
         "statistics": {"kfac": True, "ekfac": False, "raw": True}, "store": {"shard_rows": 4}}


def launch(nproc: int, task: str, root: Path, out: Path, opts: dict, check: bool = True,
           timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), task, str(root), str(out), json.dumps(opts)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{task} with {nproc} processes failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_same_rows(a: logix.Store, b: logix.Store) -> None:
    ids = sorted(a.ids, key=str)
    assert ids == sorted(b.ids, key=str)
    assert len(set(a.ids)) == len(a.ids)
    torch.testing.assert_close(a.get(ids), b.get(ids), rtol=1e-5, atol=1e-7)


def assert_same_statistics(a: Path, b: Path) -> None:
    fa, fb = Statistics.load(a).flat(), Statistics.load(b).flat()
    assert set(fa) == set(fb)
    for key in fa:
        if key.endswith("_evecs"):  # eigenvectors: compare the spans (signs are arbitrary)
            torch.testing.assert_close(fa[key].abs(), fb[key].abs(), rtol=1e-6, atol=1e-8)
        else:  # float64 sums of float32 batch terms, batched differently: equal to float32 precision
            err = float((fa[key] - fb[key]).abs().max() / fa[key].abs().max().clamp_min(1e-30))
            assert err < 1e-6, (key, err)


def scores(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The random-projection EK-FAC run, logged (and scored) by 1 and by 2 processes."""
    base = tmp_path_factory.mktemp("dist")
    for n in (1, 2):
        launch(n, "log", base / f"root{n}", base / f"out{n}", {"config": RANDOM_EKFAC})
    return base


def test_two_process_logging_equals_one_process(logged):
    one, two = logged / "root1" / "run", logged / "root2" / "run"
    train2 = logix.load_store(two / "stores" / "train")
    # both ranks wrote shards of their own; the reader merges them into one store
    assert read_rank_manifest(train2.directory, 0)["shards"] and read_rank_manifest(train2.directory, 1)["shards"]
    assert train2.manifest["ranks"] == [0, 1]
    assert_same_rows(logix.load_store(one / "stores" / "train"), train2)
    assert_same_rows(logix.load_store(one / "stores" / "queries"), logix.load_store(two / "stores" / "queries"))
    # random + EK-FAC is one pass: A, S in it, the corrections from both ranks' stored rows after it
    assert_same_statistics(one / "statistics" / "log.safetensors", two / "statistics" / "log.safetensors")
    run_json = json.loads((two / "run.json").read_text())
    assert run_json["done"] == ["log"] and run_json["finalized"]


def test_two_process_scoring_equals_one_process(logged):
    s1, s2 = scores(logged / "out1"), scores(logged / "out2")
    assert s1["top_ids"] == s2["top_ids"] and s1["bottom_ids"] == s2["bottom_ids"]
    np.testing.assert_allclose(s1["top_scores"], s2["top_scores"], rtol=1e-5)
    # the oracle: the 2-process store scored in one process, without parts
    run = logged / "root2" / "run"
    cp = load_checkpoint(run, "ekfac")
    qids = logix.load_store(run / "stores" / "queries").ids
    ref = compute_influence(cp, query_ids=qids, top_k=5, scores_path=logged / "ref.h5", progress=False)
    assert ref.top_ids == s2["top_ids"] and ref.bottom_ids == s2["bottom_ids"]
    np.testing.assert_allclose(ref.top_scores.numpy(), s2["top_scores"], rtol=1e-6)
    np.testing.assert_allclose(ref.self_influence.numpy(), s2["self_influence"], rtol=1e-10)
    with h5py.File(logged / "ref.h5") as a, h5py.File(s2["scores_path"]) as b:  # parts as one matrix
        ref_scores = a["scores"][()]  # float32 GEMMs of other chunkings: error scales with the largest term
        np.testing.assert_allclose(ref_scores, b["scores"][()], rtol=1e-6, atol=1e-6 * np.abs(ref_scores).max())


def test_pca_projection_is_computed_on_rank_0_and_shared(tmp_path):
    for n in (1, 2):
        launch(n, "log", tmp_path / f"root{n}", tmp_path / f"out{n}", {"config": PCA_EKFAC, "score": False})
    one, two = tmp_path / "root1" / "run", tmp_path / "root2" / "run"
    from safetensors.torch import load_file

    p1, p2 = load_file(str(one / "projection.safetensors")), load_file(str(two / "projection.safetensors"))
    assert set(p1) == set(p2)
    for key in p1:  # PCA of the all-reduced covariances: equal up to each eigenvector's sign
        torch.testing.assert_close(p1[key].abs(), p2[key].abs(), rtol=1e-4, atol=1e-6)
    assert_same_statistics(one / "statistics" / "full.safetensors", two / "statistics" / "full.safetensors")
    train1, train2 = logix.load_store(one / "stores" / "train"), logix.load_store(two / "stores" / "train")
    ids = sorted(train1.ids)
    # rows are projected with each run's own PCA basis: compare them in absolute value
    torch.testing.assert_close(train1.get(ids).abs(), train2.get(ids).abs(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("wrap", ["fsdp1", "fsdp2"])
def test_fsdp_sharded_model_logs_like_one_process(tmp_path, wrap):
    """FSDP (use_orig_params) and FSDP2: hooks on the original modules, canonical names, same rows."""
    opts = {"config": RANDOM_EKFAC, "n": 36, "nq": 4, "score": False}  # as many batches on each rank
    launch(1, "log", tmp_path / "root1", tmp_path / "out1", opts)
    launch(2, "log", tmp_path / "root2", tmp_path / "out2", {**opts, "wrap": wrap})
    one, two = tmp_path / "root1" / "run", tmp_path / "root2" / "run"
    train2 = logix.load_store(two / "stores" / "train")
    assert train2.layout.names == ["emb", "fc", "head"]
    assert_same_rows(logix.load_store(one / "stores" / "train"), train2)
    assert_same_statistics(one / "statistics" / "log.safetensors", two / "statistics" / "log.safetensors")


def test_duplicate_ids_across_ranks(tmp_path):
    launch(2, "dup", tmp_path / "root", tmp_path / "out", {"config": CRASH})
    records = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for record in records:  # every rank raises, naming the cause and the fix
        assert "DuplicateIdError" in record["error"] and "shard_indices" in record["error"]
        assert record["skip"] is None
    error_store = tmp_path / "root" / "error" / "stores" / "train"
    with pytest.raises(StoreError, match="3 ids are held by more than one row"):
        _ = logix.load_store(error_store).ids  # a store holding duplicates is refused by readers ...
    assert any("more than one row" in p.problem for p in logix.load_store(error_store).verify())
    kept = Store(error_store, check_duplicates=False)  # ... and nothing logged is lost
    assert kept.n_rows == 8 + 7
    skip = logix.load_store(tmp_path / "root" / "skip" / "stores" / "train")
    assert sorted(skip.ids) == sorted(f"ex{i}" for i in range(12))
    for i in range(5, 8):  # the lowest rank's row is the one kept
        torch.testing.assert_close(skip.get([f"ex{i}"]), kept.get([f"ex{i}"]))


@pytest.mark.slow
@pytest.mark.parametrize("resume_procs", [2, 1])
def test_killed_rank_keeps_committed_shards_and_resume_completes(tmp_path, resume_procs):
    """Rank 1 is SIGKILLed mid-pass (torchrun then stops rank 0). Resumed with 2 processes each rank
    continues from its own committed state; with 1 process rank 0 also adopts rank 1's."""
    root = tmp_path / "root"
    opts = {"config": CRASH, "kill_after": 3, "batch": 2, "score": False}
    proc = launch(2, "crash", root, tmp_path / "out", opts, check=False)
    assert proc.returncode != 0
    train = root / "run" / "stores" / "train"
    rank1 = read_rank_manifest(train, 1)
    assert rank1 is not None and sum(s["rows"] for s in rank1["shards"]) >= 4  # rank 1 committed shards
    partial = logix.load_store(train)
    assert 0 < partial.n_rows < 37
    launch(1, "log", tmp_path / "ref", tmp_path / "ref_out", {"config": CRASH, "score": False})
    reference = logix.load_store(tmp_path / "ref" / "run" / "stores" / "train")
    ids = partial.ids
    torch.testing.assert_close(partial.get(ids), reference.get(ids), rtol=1e-5, atol=1e-7)  # whole rows only

    launch(resume_procs, "log", root, tmp_path / "out2", {"config": CRASH, "batch": 2, "score": False})  # resume
    assert_same_rows(reference, logix.load_store(train))
    assert_same_statistics(tmp_path / "ref" / "run" / "statistics" / "log.safetensors",
                           root / "run" / "statistics" / "log.safetensors")


@pytest.mark.slow
def test_trainer_callback_under_accelerate_launch_equals_one_process(tmp_path):
    pytest.importorskip("accelerate")
    stores = {}
    for n in (1, 2):
        # accelerate 1.x's `--cpu` launcher starts one process on one machine (several need an MPI
        # hostfile); its torchrun-based `--multi_gpu` launcher runs CPU processes on gloo when the
        # script asks for the CPU (TrainingArguments(use_cpu=True)).
        mode = "--cpu" if n == 1 else "--multi_gpu"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), mode,
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               str(WORKER), "trainer", str(tmp_path / f"root{n}"), str(tmp_path / f"out{n}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-5000:]
        ranks = [json.loads((tmp_path / f"out{n}" / f"rank-{r}.json").read_text()) for r in range(n)]
        assert [r["world"] for r in ranks] == [n] * n
        stores[n] = tmp_path / f"root{n}" / "trainer"
    index1 = json.loads((stores[1] / "checkpoints.json").read_text())["checkpoints"]
    index2 = json.loads((stores[2] / "checkpoints.json").read_text())["checkpoints"]
    assert [c["name"] for c in index1] == [c["name"] for c in index2] == ["start", "final"]
    for name in ("start", "final"):
        for store in ("train", "queries"):
            a = logix.load_store(stores[1] / name / "stores" / store)
            b = logix.load_store(stores[2] / name / "stores" / store)
            assert b.manifest.get("ranks") == [0, 1]
            ids = sorted(a.ids)
            assert ids == sorted(b.ids)
            tol = 1e-5 if name == "start" else 2e-3  # after training: DDP's averaged gradients
            torch.testing.assert_close(a.get(ids), b.get(ids), rtol=tol, atol=tol * 1e-2)


@pytest.mark.slow
def test_cli_extract_and_influence_under_torchrun_equal_one_process(tmp_path):
    """`torchrun -m logix.cli extract` then `torchrun -m logix.cli influence`: same outputs as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ["configs/quickstart.yaml", f"root={tmp_path}", "data.limit_train=120", "data.limit_queries=6",
              "projection.rank_in=4", "projection.rank_out=4", "--quiet"]
    for n in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                    "-m", "logix.cli"]
        for args in (["extract", *common, "--project", f"p{n}"],
                     ["influence", str(tmp_path / f"p{n}"), "--save-scores", "--part-rows", "32", "--quiet"]):
            proc = subprocess.run(launcher + args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
            assert proc.returncode == 0, proc.stderr[-4000:]
    one = [json.loads(line) for line in (tmp_path / "p1" / "influence.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "p2" / "influence.jsonl").read_text().splitlines()]
    assert [[p["id"] for p in q["proponents"]] for q in one] == [[p["id"] for p in q["proponents"]] for q in two]
    train2 = logix.load_store(tmp_path / "p2" / "model" / "stores" / "train")
    assert train2.manifest["ranks"] == [0, 1] and train2.n_rows == 120
    with h5py.File(tmp_path / "p1" / "scores.h5") as a, \
            h5py.File(tmp_path / "p2" / "scoring" / "scores.h5") as b:
        np.testing.assert_allclose(a["scores"][()], b["scores"][()], rtol=1e-4, atol=1e-6 * np.abs(a["scores"][()]).max())


@pytest.mark.slow
def test_cli_run_under_torchrun_trains_logs_and_scores(tmp_path):
    """`torchrun -m logix.cli run`: the Trainer trains with DDP, the callback logs on both processes
    into one store per checkpoint, the analysis is scored in parts and rank 0 writes the outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "logix.cli",
           "run", "configs/quickstart.yaml", f"root={tmp_path}", "data.limit_train=96", "data.limit_queries=6",
           "train.epochs=1", "schedule.epochs=[1]", "--project", "two", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("outputs in") == 1  # printed by rank 0 only
    project = tmp_path / "two"
    entries = json.loads((project / "checkpoints.json").read_text())["checkpoints"]
    assert [e["name"] for e in entries] == ["epoch-1"]
    train = logix.load_store(project / "epoch-1" / "stores" / "train")
    assert train.manifest["ranks"] == [0, 1] and sorted(train.ids) == sorted(set(train.ids)) and train.n_rows == 96
    records = [json.loads(line) for line in (project / "influence.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(len(r["proponents"]) == 10 for r in records)
    assert (project / "scoring" / "job.json").exists()

"""Every stored byte is verified on read: flipped bytes, swapped ids, a shard listed twice,
truncation, damaged headers, garbage manifests and damaged statistics raise a StoreError naming
the file, and ``logix verify`` names each damaged file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import logix
from logix.analysis import influence
from logix.cli import main
from logix.errors import StoreError
from logix.store.format import MANIFEST, manifest_checksum, write_manifest
from logix.store.rundir import statistics_file, store_dir
from logix.store.verify import verify_path


def _train(run_dir: Path) -> Path:
    return store_dir(run_dir)


def _entry(run_dir: Path, index: int) -> dict:
    return json.loads((_train(run_dir) / MANIFEST).read_text())["shards"][index]


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _score(run_dir: Path):
    return influence(run_dir, top_k=5, progress=False)


def test_an_intact_run_verifies_and_scores(run_dir, capsys):
    assert verify_path(run_dir).ok
    assert main(["verify", str(run_dir)]) == 0
    assert "OK: 2 stores (36 rows)" in capsys.readouterr().out
    assert len(_score(run_dir).train_ids) == 32


@pytest.mark.parametrize("where", ["rows", "ids", "header"])
def test_a_flipped_byte_in_a_shard_is_refused_naming_it(run_dir, where):
    entry = _entry(run_dir, 1)
    shard = _train(run_dir) / entry["file"]
    if where == "rows":  # a bit flip in the middle of the rows: values change silently without a check
        offset = entry["data"][0] + entry["data"][1] // 2
    elif where == "ids":  # 'ex9' becomes 'ex)': another example's id
        offset = shard.read_bytes().index(b"ex9") + 2
    else:
        offset = 0x30
    _flip(shard, offset)
    with pytest.raises(StoreError, match=entry["file"]):
        _score(run_dir)
    problems = verify_path(run_dir).problems
    assert [p.file.name for p in problems] == [entry["file"]]


def test_swapped_ids_between_shards_are_refused(run_dir):
    first, second = (_train(run_dir) / _entry(run_dir, i)["file"] for i in (0, 1))
    with h5py.File(first, "r+") as a, h5py.File(second, "r+") as b:
        ids_a, ids_b = a["ids"][()], b["ids"][()]
        ids_a[0], ids_b[0] = ids_b[0], ids_a[0]
        a["ids"][...] = ids_a
        b["ids"][...] = ids_b
    with pytest.raises(StoreError, match="do not match the checksum"):
        _ = logix.load_store(_train(run_dir)).ids
    assert {p.file.name for p in verify_path(run_dir).problems} == {first.name, second.name}


def test_a_shard_listed_twice_is_refused(run_dir):
    path = _train(run_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["shards"].append(manifest["shards"][0])
    path.write_text(json.dumps(manifest))  # edited by hand: the checksum no longer matches
    with pytest.raises(StoreError, match="does not match its checksum|do not match its checksum|checksum"):
        _score(run_dir)
    write_manifest(path, manifest)  # even a manifest written with a valid checksum
    with pytest.raises(StoreError, match="lists this shard twice"):
        _score(run_dir)


@pytest.mark.parametrize("delta", [-1, 1, 5])
def test_manifest_row_counts_off_by_n_are_refused(run_dir, delta):
    path = _train(run_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["shards"][2]["rows"] += delta
    manifest["checksum"] = manifest_checksum(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=rf"{manifest['shards'][2]['file']}.*manifest records {8 + delta} rows"):
        _score(run_dir)


@pytest.mark.parametrize("content", [b"", b"\x00garbage", b"[1, 2]", b'{"format": 2}'])
def test_a_garbage_manifest_is_refused_naming_it(run_dir, content):
    (_train(run_dir) / MANIFEST).write_bytes(content)
    with pytest.raises(StoreError, match=r"manifest\.json"):
        _score(run_dir)


def test_a_truncated_shard_is_refused(run_dir):
    shard = _train(run_dir) / _entry(run_dir, 3)["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(StoreError, match=rf"{shard.name}: truncated"):
        logix.load_store(_train(run_dir))


def test_a_missing_shard_is_refused(run_dir):
    shard = _train(run_dir) / _entry(run_dir, 0)["file"]
    shard.unlink()
    with pytest.raises(StoreError, match=rf"{shard.name}: the file is missing"):
        logix.load_store(_train(run_dir))


def test_a_flipped_byte_in_the_statistics_is_refused(run_dir):
    stats = statistics_file(run_dir, "kfac")
    if not stats.exists():
        stats = next(statistics_file(run_dir).parent.glob("*.safetensors"))
    _flip(stats, stats.stat().st_size - 17)  # inside the last tensor's bytes
    with pytest.raises(StoreError, match=stats.name):
        _score(run_dir)
    assert [p.file for p in verify_path(run_dir).problems] == [stats]


def test_verify_names_every_damaged_file_and_exits_1(run_dir, capsys):
    bad = []
    for i in (0, 2):
        entry = _entry(run_dir, i)
        _flip(_train(run_dir) / entry["file"], entry["data"][0] + 5)
        bad.append(entry["file"])
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert all(f"BAD {_train(run_dir) / name}" in out for name in bad)
    assert "2 PROBLEM(S)" in out


def test_rows_read_back_are_the_rows_written(run_dir):
    """The checks cost nothing in correctness: an intact store reads back exactly."""
    store = logix.load_store(_train(run_dir))
    streamed = np.concatenate([c.rows.numpy() for c in store.iter_chunks(5)])
    np.testing.assert_array_equal(streamed, store.read_all().numpy())

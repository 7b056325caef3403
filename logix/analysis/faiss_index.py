"""The parts of the index around faiss: which faiss index each kind is, its default parameters,
the vectors it holds (augmented, reduced), its files, the preconditioner of its queries."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from torch import Tensor

from logix.analysis.checkpoints import rows_projected
from logix.analysis.kernels import TopK, self_influence_rows
from logix.analysis.precondition import Preconditioner
from logix.config.choices import IndexKind, PreconditionerType, ScoreMode
from logix.config.damping import Damping
from logix.core.checksum import save_tensors
from logix.core.statistics import Statistics
from logix.errors import LogixError, StoreError
from logix.store.format import fsync_file, write_json_atomic
from logix.store.integrity import file_digest
from logix.store.reader import Store
from logix.store.rundir import (
    TRAIN_STORE,
    index_dir,
    index_file,
    index_meta_file,
    index_norms_file,
    statistics_file,
    store_dir,
)


def load_faiss():
    """The faiss module, or a LogixError naming the package to install."""
    try:
        import faiss
    except ImportError as exc:
        raise LogixError("The index needs faiss: pip install faiss-cpu (or faiss-gpu where CUDA is).") from exc
    return faiss


NORMED = (ScoreMode.RELATIVE, ScoreMode.COSINE)
GRAPHS = (IndexKind.HNSW, IndexKind.HNSWSQ4)
INVERTED = (IndexKind.IVFFLAT, IndexKind.IVFSQ8, IndexKind.IVFPQ)


def augmented_dim(kind: IndexKind, dim: int) -> int:
    """The indexed width: ``dim`` (flat, graphs: the rows themselves), else ``dim + 1`` (the norm
    coordinate of the inverted files) rounded up to 8."""
    return -(-(dim + 1) // 8) * 8 if kind in INVERTED else dim


def default_params(kind: IndexKind, n: int, dim: int) -> dict[str, int]:
    """nlist about 4 sqrt(n) (a power of two, 16 to 65,536); PQ with the largest divisor of dim up to
    dim/4 parts of ``nbits`` = 8 bits (fewer for stores under 256 rows)."""
    nlist = int(min(65536, max(16, 2 ** round(math.log2(max(4 * math.sqrt(max(n, 1)), 1))))))
    nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
    m = max(d for d in range(1, max(dim // 4, 1) + 1) if dim % d == 0)
    nbits = max(1, min(8, int(math.log2(max(n / 39, 2)))))  # faiss wants >= 39 training rows per centroid
    return {"nlist": nlist, "m": m, "nbits": nbits, "hnsw_m": 16}


def empty_index(faiss, kind: IndexKind, width: int, params: dict[str, int]):
    """Flat: exact inner products; graphs: a walk by inner product over the rows themselves;
    inverted files: lists by Euclidean distance over augmented vectors, codes scored by inner product."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind is IndexKind.FLAT:
        return faiss.IndexFlatIP(width)
    if kind in GRAPHS:  # a graph on inner products finds large-norm rows well (unlike augmented L2)
        graph = (faiss.IndexHNSWFlat(width, params["hnsw_m"], ip) if kind is IndexKind.HNSW else
                 faiss.IndexHNSWSQ(width, faiss.ScalarQuantizer.QT_4bit, params["hnsw_m"], ip))
        graph.hnsw.efConstruction = 100  # faiss's 40 leaves recall@10 0.02-0.03 lower at the same search cost
        return graph
    # Inverted files: rows are assigned to lists (and queries probe lists) by Euclidean distance over
    # the augmented vectors, but the codes are scored by inner product with the query's ``[q, 0]``,
    # i.e. ``<q, x>`` itself: the norm coordinate's (large) quantization error never enters a score.
    quantizer = faiss.IndexFlatL2(width)  # faiss's Python wrapper keeps it alive with the index
    if kind is IndexKind.IVFFLAT:
        index = faiss.IndexIVFFlat(quantizer, width, params["nlist"], ip)
    elif kind is IndexKind.IVFSQ8:
        index = faiss.IndexIVFScalarQuantizer(quantizer, width, params["nlist"], faiss.ScalarQuantizer.QT_8bit, ip)
        index.by_residual = False  # faiss's SQ scanner would start each list's scores from the L2 coarse distance
    else:
        index = faiss.IndexIVFPQ(quantizer, width, params["nlist"], params["m"], params["nbits"], ip)
    index.cp.spherical = False  # plain k-means on the augmented vectors (faiss's IP default is spherical)
    return index


def gpus_for(faiss, gpu: bool | None) -> int:
    """How many GPUs the lists' k-means runs on: faiss's count (0 with faiss-cpu) unless ``gpu`` is
    False; ``gpu=True`` without one is an error naming the package."""
    count = int(getattr(faiss, "get_num_gpus", lambda: 0)()) if gpu is not False else 0
    if gpu and count == 0:
        raise LogixError("gpu=True, but faiss sees no GPU: install faiss-gpu (the CUDA build) on a machine with "
                         "one, or build on the CPU (gpu=None / False).")
    return count


def train_lists(faiss, index, vectors: np.ndarray, nlist: int, seed: int, gpus: int) -> None:
    """The inverted lists' centroids: plain (not spherical) k-means of the augmented ``vectors``,
    on ``gpus`` GPUs when there are any, put in the index's quantizer; faiss's own ``train`` then
    finds the lists trained and trains only the codes (PQ / SQ) on the CPU."""
    kmeans = faiss.Kmeans(vectors.shape[1], nlist, niter=10, seed=seed, spherical=False, gpu=gpus or False)  # faiss IVF's own 10
    kmeans.train(vectors)
    faiss.extract_index_ivf(index).quantizer.add(kmeans.centroids)


def row_divisors(mode: ScoreMode, rows: Tensor, norms: Tensor | None) -> Tensor | None:
    """What each row's dot product with a transformed query is divided by to be its score in
    ``mode`` (``rows``' own norms for unit, their stored ``H``-norms ``norms`` for relative /
    cosine; None for dot)."""
    if mode is ScoreMode.UNIT:
        return rows.to(torch.float64).norm(dim=1).clamp_min(1e-30)
    return norms.clamp_min(1e-300) if mode in NORMED else None


def exact_top(store: Store, pq: Tensor, mode: ScoreMode, norms: Tensor | None, k: int) -> Tensor:
    """The exact top-``k`` rows (positions) of each transformed query ``pq`` by one scan of the store."""
    best = TopK(pq.shape[0], k, largest=True)
    for chunk in store.iter_chunks():
        exact = (chunk.rows.to(torch.float32) @ pq.T).T.to(torch.float64)
        span = None if norms is None else norms[chunk.start : chunk.start + exact.shape[1]]
        divisors = row_divisors(mode, chunk.rows, span)
        if divisors is not None:
            exact /= divisors[None, :]
        best.update(exact, chunk.start)
    return best.index


def augment(vectors: Tensor, width: int, top: float) -> np.ndarray:
    """``[x, sqrt(top^2 - |x|^2), 0...]`` (``width`` columns; ``x`` itself when width is its own)."""
    x = vectors.numpy().astype(np.float32, copy=False)
    if width == x.shape[1]:
        return np.ascontiguousarray(x)
    out = np.zeros((x.shape[0], width), np.float32)
    out[:, : x.shape[1]] = x
    out[:, x.shape[1]] = np.sqrt(np.maximum(np.float64(top) ** 2 - (x.astype(np.float64) ** 2).sum(1), 0.0))
    return out


def store_fingerprint(store: Store) -> str:
    """xxh3-128 of the store's committed shards (names, rows, checksums): changes with any commit."""
    entries = [[s["file"], s["rows"], s.get("xxh3_meta"), s.get("xxh3_data")] for s in store.manifest["shards"]]
    return xxhash.xxh3_128(json.dumps(entries).encode()).hexdigest()


def leading_basis(sample: Tensor, r: int) -> Tensor:
    """The ``r`` leading eigenvectors (``(dim, r)`` float64) of the sample's uncentered second
    moment: inner products (not distances from a mean) are what the index must keep."""
    values, vectors = torch.linalg.eigh(sample.to(torch.float64).T @ sample.to(torch.float64))
    return vectors[:, values.argsort(descending=True)[:r]].contiguous()


def save_index(run_dir: Path, faiss, index, meta: dict[str, Any], extras: dict[str, Tensor]) -> None:
    """Write the index, its extras and last ``index.json`` (which names the index file) atomically."""
    folder = index_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = index_file(run_dir)
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)
    if extras:  # the rows' H-norms (relative / cosine), the reduced basis
        extras_tmp = index_norms_file(run_dir).with_name(f".{index_norms_file(run_dir).name}.tmp")
        save_tensors(extras_tmp, extras)
        fsync_file(extras_tmp)
        os.replace(extras_tmp, index_norms_file(run_dir))
    else:
        index_norms_file(run_dir).unlink(missing_ok=True)  # not one of an earlier build
    meta = {**meta, "file": {k: v for k, v in file_digest(path).items()}}
    write_json_atomic(index_meta_file(run_dir), meta)  # last: the index exists once this names it


def index_vectors(rows: Tensor, mode: ScoreMode, pre: Preconditioner | None, norms: list | None = None) -> Tensor:
    """The indexed vectors of train ``rows`` (float32), collecting their H-norms in ``norms``."""
    rows = rows.to(torch.float32)
    if mode is ScoreMode.UNIT:
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if mode in NORMED:
        norm = self_influence_rows(pre, rows).clamp_min(0).sqrt()
        if norms is not None:
            norms.append(norm)
        return (rows.to(torch.float64) / norm.clamp_min(1e-300)[:, None]).to(torch.float32)
    return rows


def preconditioner_of(run_dir: Path, store: Store, kind: PreconditionerType, damping: Damping | None):
    stats_path = statistics_file(run_dir)
    stats = Statistics.load(stats_path) if stats_path.exists() else None
    if stats is None and kind not in (PreconditionerType.IDENTITY, PreconditionerType.AUTO):
        raise StoreError(f"{run_dir} has no finalized statistics ({stats_path}) for the {kind.value} preconditioner.")
    return Preconditioner(kind, stats, store.layout, damping, projected=rows_projected(run_dir))


def index_status(run_dir: str | Path) -> tuple[ScoreMode, bool] | None:
    """``(mode, fresh)`` of ``run_dir``'s index without loading it (None: no readable index);
    ``fresh``: built from the train store as it is now."""
    try:
        meta = json.loads(index_meta_file(run_dir).read_text())
        mode = ScoreMode.parse(meta["mode"], "mode")
    except (OSError, ValueError, KeyError, TypeError, LogixError):
        return None
    return mode, store_fingerprint(Store(store_dir(run_dir, TRAIN_STORE))) == meta.get("store")

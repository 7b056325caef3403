"""Approximate top-k over a run's train rows: a faiss index whose inner products are the scores.

The index holds one vector per train row and the query is transformed so that their inner
product is the influence score of the chosen mode (``H^-1`` the preconditioner):

=========  ==============================  ==========================================
mode       indexed vector of a row ``g``    query vector of a logged query ``q``
=========  ==============================  ==========================================
dot        ``g``                           ``H^-1 q``
unit       ``g / |g|``                     ``H^-1 (q / |q|)``
relative   ``g / ||g||_H``                 ``H^-1 q``
cosine     ``g / ||g||_H``                 ``H^-1 q / ||q||_H``
=========  ==============================  ==========================================

so a ``dot`` or ``unit`` index serves every preconditioner and damping (they only change the
query), while a ``relative`` / ``cosine`` index is built for one (its rows' ``H``-norms). The
inverted files (``ivf*``) assign rows to lists and probe lists by Euclidean distance after the
usual reduction of maximum inner product to nearest neighbours: each vector ``x`` gains a
coordinate ``sqrt(M^2 - |x|^2)`` (``M`` the largest norm, from a first pass) and each query a 0
(lists of raw inner products miss large-norm rows: recall 0.39 against 0.98 on the clustered
store of the tests); within the lists the codes are scored by inner product with ``[q, 0]``, the
score itself, so the norm coordinate's quantization error never enters it. The graphs
(``hnsw*``) walk by inner product over the rows as they are. The index proposes ``rerank x k`` candidates per query; they are scored exactly against the
store's rows and the best ``k`` returned, so **every returned score is exact** and only which
rows are returned is approximate (measured as recall against the exact scan in
``benchmarks/bench_index.py``). ``flat`` is the exact scan itself.

Built in one streaming pass over the store (plus a sampled training set for ``ivf*`` kinds),
saved in ``<run>/index/`` under temporary names and renamed, with the index file's xxh3-128
hash and a fingerprint of the store it indexes in ``index.json``: loading refuses a damaged
file and an index of a store that changed since (rebuild with ``logix index``). The index is
read memory-mapped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logix.analysis.checkpoints import rows_projected
from logix.analysis.faiss_index import (
    GRAPHS,
    INVERTED,
    NORMED,
    augment,
    augmented_dim,
    default_params,
    empty_index,
    exact_top,
    gpus_for,
    index_vectors,
    leading_basis,
    load_faiss,
    preconditioner_of,
    row_divisors,
    save_index,
    store_fingerprint,
    train_lists,
)
from logix.analysis.precondition import Preconditioner
from logix.config.choices import IndexKind, PreconditionerType, ScoreMode
from logix.config.damping import Damping, default_damping
from logix.core.checksum import load_tensors
from logix.core.progress import progress_bar
from logix.errors import LogixError, StoreError
from logix.store.format import write_json_atomic
from logix.store.integrity import file_digest, size_problem
from logix.store.reader import Store
from logix.store.rundir import (
    QUERY_STORE,
    TRAIN_STORE,
    index_file,
    index_meta_file,
    index_norms_file,
    store_dir,
)

AUTO_SAMPLE, AUTO_RECALL = 100, 0.9  # kind auto: query rows sampled to measure recall@10, and the bar
AUTO_FLAT_BYTES = 2**30  # kind auto: neither approximate kind recalls 0.9 -> the exact scan when rows fit this


@dataclass
class IndexHits:
    """The best ``k`` train rows per query, as :meth:`Index.search` returns them.

    Attributes:
        index: ``(n_query, k)`` int64 train-row positions; -1 where fewer than ``k`` rows were found.
        scores: ``(n_query, k)`` float64 exact scores of those rows.
        ids: Per query, the ids of those rows.
    """

    index: Tensor  # (n_query, k) int64; -1 where fewer than k rows were found
    scores: Tensor  # (n_query, k) float64, exact scores of those rows
    ids: list[list]


class Index:
    """A faiss index over the train rows of one run directory: the top-k of each query at scale.

    Made with :meth:`build` (what ``logix index`` runs) or :meth:`load`. The index holds one vector
    per train row, transformed so that its inner product with the transformed query is the score
    of the index's mode; :meth:`search` proposes ``rerank x k`` candidates per query and scores
    them exactly against the store, so every returned score is exact and only which rows are
    returned is approximate (``flat`` is the exact scan). A ``dot`` or ``unit`` index serves every
    preconditioner and damping; a ``relative`` / ``cosine`` index is built for one. Loading refuses
    a damaged index file and an index of a store that changed since it was built.

    Args:
        run_dir: The run directory whose train store the index covers.
        index: The faiss index.
        meta: Its metadata (``index.json``: kind, mode, the store's fingerprint, the file's hash).
        norms: The rows' ``H``-norms of a ``relative`` / ``cosine`` index, else None.
    """

    def __init__(self, run_dir: Path, index: Any, meta: dict[str, Any], norms: Tensor | None) -> None:
        self.run_dir = Path(run_dir)
        self.faiss_index = index
        self.meta = meta
        self.norms = norms
        self.basis: Tensor | None = None  # (dim, reduce) float64 of a reduced index
        self.mode = ScoreMode.parse(meta["mode"], "mode")
        self.kind = IndexKind.parse(meta["kind"], "kind")
        self.store = Store(store_dir(run_dir, TRAIN_STORE))
        self._pre: dict[tuple, Preconditioner] = {}

    # ---- build ----------------------------------------------------------------------------------
    @classmethod
    def build(cls, run_dir: str | Path, kind: IndexKind | str = IndexKind.AUTO, **options: Any) -> Index:
        """Index the train rows of ``run_dir`` (options: those of :meth:`build_kind`). ``auto``: ``ivfpq``
        (inverted lists suit rows that cluster) if its recall@10 on 100 sampled query rows
        (:meth:`recall`) is >= 0.9, else ``hnswsq4`` (rows without clusters; all coordinates, unless
        ``reduce`` is given) if it recalls more, else
        ``flat`` when neither reaches 0.9 and the float32 rows fit 1 GiB. Recalls: ``meta["choice"]``."""
        kind = IndexKind.parse(kind, "kind")
        if kind is not IndexKind.AUTO:
            return cls.build_kind(run_dir, kind, **options)
        index = cls.build_kind(run_dir, IndexKind.IVFPQ, **options)
        measured = {"ivfpq": index.recall(sample=AUTO_SAMPLE)}
        if measured["ivfpq"] < AUTO_RECALL:
            graph_options = {k: v for k, v in options.items() if k not in ("nlist", "m", "nbits")}
            index = cls.build_kind(run_dir, IndexKind.HNSWSQ4, **graph_options)
            measured["hnswsq4"] = index.recall(sample=AUTO_SAMPLE)
            if max(measured.values()) < AUTO_RECALL and index.store.n_rows * index.meta["dim"] * 4 <= AUTO_FLAT_BYTES:
                flat = ("mode", "preconditioner", "damping", "progress")
                index = cls.build_kind(run_dir, IndexKind.FLAT, **{k: v for k, v in options.items() if k in flat})
            elif measured["hnswsq4"] < measured["ivfpq"]:
                index = cls.build_kind(run_dir, IndexKind.IVFPQ, **options)
        index.meta["choice"] = {"recall@10": measured, "sample": AUTO_SAMPLE, "threshold": AUTO_RECALL}
        write_json_atomic(index_meta_file(run_dir), index.meta)
        return index

    @classmethod
    def build_kind(cls, run_dir: str | Path, kind: IndexKind | str = IndexKind.IVFPQ,
                   mode: ScoreMode | str = ScoreMode.DOT,
                   preconditioner: PreconditionerType | str = PreconditionerType.AUTO, damping: Damping | None = None,
                   nlist: int | None = None, m: int | None = None, nbits: int | None = None,
                   hnsw_m: int | None = None, train_rows: int | None = None, reduce: int | None = None,
                   chunk_rows: int = 8192, seed: int = 0, gpu: bool | None = None, progress: bool = True) -> Index:
        """Index the train rows of ``run_dir`` as ``kind`` in streaming passes; save it in ``<run>/index/``.

        ``preconditioner`` / ``damping`` matter for ``relative`` / ``cosine`` only (the rows'
        norms); ``nlist`` / ``m`` / ``nbits`` (``ivf*``) and ``hnsw_m`` default to
        :func:`default_params`; ``train_rows``: the sampled training set, default
        ``max(40 nlist, 10,000 if PQ)`` rows (``ivf*``), 20,000 (graphs, ``reduce``). ``reduce``: index
        the rows' coordinates on the ``reduce`` leading eigenvectors of their (uncentered) second
        moment, estimated on the training set, so that inner products there approximate the scores
        (candidates are still re-scored exactly): fewer bytes per row where the rows' energy is
        concentrated. ``gpu``: the lists' k-means on the GPUs faiss sees (None: when it sees any;
        the graphs and the codes train on the CPU). Memory: the training sample, one chunk, the index."""
        faiss = load_faiss()
        run_dir = Path(run_dir)
        kind, mode = IndexKind.parse(kind, "kind"), ScoreMode.parse(mode, "mode")
        if kind is IndexKind.AUTO:
            raise LogixError("build_kind needs a concrete kind; Index.build(kind='auto') chooses one.")
        pre_kind = PreconditionerType.parse(preconditioner, "preconditioner")
        store = Store(store_dir(run_dir, TRAIN_STORE))
        n, dim = store.n_rows, store.dim
        if n == 0:
            raise StoreError(f"{run_dir} has no train rows to index.")
        if reduce is not None and (kind is IndexKind.FLAT or not 1 <= reduce < dim):
            raise LogixError(f"reduce={reduce} must be between 1 and the rows' {dim} values (exclusive), and the "
                             "kind approximate (flat is the exact scan).")
        width = augmented_dim(kind, reduce or dim)
        params = {**default_params(kind, n, width), **{k: v for k, v in
                  {"nlist": nlist, "m": m, "nbits": nbits, "hnsw_m": hnsw_m}.items() if v is not None}}
        for key, value in params.items():
            if not isinstance(value, int) or value < 1:
                raise LogixError(f"Index parameter {key} must be a positive integer, got {value!r}.")
        if kind is IndexKind.IVFPQ and width % params["m"]:
            raise LogixError(f"m={params['m']} must divide the indexed width {width} (the {dim} values of a row, "
                             "its norm coordinate and zero padding to a multiple of 8; PQ splits it in m parts).")
        if kind is IndexKind.IVFPQ and n < 2 ** params["nbits"]:
            raise LogixError(f"nbits={params['nbits']} needs at least {2 ** params['nbits']} rows to train on; "
                             f"the store has {n}: lower nbits or use kind flat.")
        pre = preconditioner_of(run_dir, store, pre_kind, damping) if mode in NORMED else None
        pre_kind = pre.kind if pre is not None else pre_kind  # auto: the kind the run's statistics allow
        damping = damping if damping is not None else default_damping(pre_kind, rows_projected(run_dir))
        started = time.perf_counter()
        train_s = 0.0
        index = empty_index(faiss, kind, width, params)
        norms: list[Tensor] = []
        passes = 2 if kind in INVERTED else 1
        bar = progress_bar(total=passes * n, desc=f"logix index ({kind.value})", unit="row", enabled=progress)
        top, sample, basis = 0.0, None, None
        if not index.is_trained or reduce:
            wanted = train_rows or (20_000 if kind in GRAPHS or kind is IndexKind.FLAT else
                                    max(40 * params["nlist"], 10_000 if kind is IndexKind.IVFPQ else 0))
            pick = np.sort(np.random.default_rng(seed).choice(n, size=min(n, wanted), replace=False))
            sample = index_vectors(store.take(pick), mode, pre)
        if reduce:
            basis = leading_basis(sample, reduce)
            sample = sample @ basis.to(torch.float32)

        def vectors(rows: Tensor, collect: list | None) -> Tensor:
            out = index_vectors(rows, mode, pre, collect)
            return out if basis is None else out @ basis.to(torch.float32)

        if passes == 2:  # pass 1: the largest vector norm (and the rows' H-norms)
            for chunk in store.iter_chunks(chunk_rows):
                top = max(top, float(vectors(chunk.rows, norms).norm(dim=1).max()))
                bar.update(chunk.rows.shape[0])
        if not index.is_trained:
            train_start = time.perf_counter()
            augmented = augment(sample, width, top)
            if kind in INVERTED:
                train_lists(faiss, index, augmented, params["nlist"], seed, gpus_for(faiss, gpu))
            index.train(augmented)
            train_s = time.perf_counter() - train_start
        del sample
        for chunk in store.iter_chunks(chunk_rows):
            index.add(augment(vectors(chunk.rows, norms if passes == 1 else None), width, top))
            bar.update(chunk.rows.shape[0])
        bar.close()
        meta = {"kind": kind.value, "mode": mode.value, "params": params, "rows": n, "dim": dim, "width": width,
                "reduce": reduce,
                "max_norm": top,
                "preconditioner": pre_kind.value if mode in NORMED else None,
                "damping": {"value": damping.value, "relative": damping.relative} if mode in NORMED else None,
                "store": store_fingerprint(store), "build_s": round(time.perf_counter() - started, 3),
                "train_s": round(train_s, 3)}
        extras = {"norms": torch.cat(norms).to(torch.float64)} if norms else {}
        if basis is not None:
            extras["basis"] = basis
        save_index(run_dir, faiss, index, meta, extras)
        return cls.load(run_dir)

    # ---- load -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: str | Path) -> Index:
        """Read ``<run>/index/`` memory-mapped, after checking the file against its hash and the
        store against the fingerprint taken at build (a :class:`StoreError` otherwise)."""
        faiss = load_faiss()
        run_dir = Path(run_dir)
        meta_path = index_meta_file(run_dir)
        if not meta_path.exists():
            raise StoreError(f"{run_dir} has no index ({meta_path}): build one with `logix index {run_dir}`.")
        try:
            meta = json.loads(meta_path.read_text())
            recorded = meta["file"]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"Damaged file {meta_path}: not an index description ({exc}). Rebuild the index.") from exc
        path = index_file(run_dir)
        problem = size_problem(path, recorded["bytes"])
        if problem is None and file_digest(path)["xxh3"] != recorded["xxh3"]:
            problem = "its bytes do not match the checksum index.json records"
        if problem is not None:
            raise StoreError(f"Damaged file {path}: {problem}. Rebuild the index with `logix index {run_dir}`.")
        store = Store(store_dir(run_dir, TRAIN_STORE))
        if store_fingerprint(store) != meta["store"]:
            raise StoreError(f"The index of {run_dir} is stale: the train store changed after it was built. "
                             f"Rebuild it with `logix index {run_dir}`.")
        extras = load_tensors(index_norms_file(run_dir)) if index_norms_file(run_dir).exists() else {}
        if (meta["mode"] in [m.value for m in NORMED] and "norms" not in extras) or (
                meta.get("reduce") and "basis" not in extras):
            raise StoreError(f"{index_norms_file(run_dir)} is missing or lacks the rows' norms / the reduced basis "
                             f"this index needs. Rebuild the index with `logix index {run_dir}`.")
        index = cls(run_dir, faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), meta,
                    extras.get("norms"))
        index.basis = extras.get("basis")
        return index

    @property
    def nbytes(self) -> int:
        """Bytes of the index file (the memory it needs once mapped)."""
        return index_file(self.run_dir).stat().st_size

    def __len__(self) -> int:
        return int(self.faiss_index.ntotal)

    # ---- search ---------------------------------------------------------------------------------
    def preconditioner(self, kind: PreconditionerType | str | None = None, damping: Damping | None = None):
        """The preconditioner queries are transformed with (the index's own for relative / cosine)."""
        if self.mode in NORMED:
            asked = None if kind is None else PreconditionerType.parse(kind, "preconditioner").value
            if asked not in (None, self.meta["preconditioner"]) or (
                    damping is not None and (damping.value, damping.relative) != tuple(self.meta["damping"].values())):
                raise LogixError(f"This {self.mode.value} index was built for the {self.meta['preconditioner']} "
                                 f"preconditioner with damping {self.meta['damping']}: rebuild it for other settings.")
            kind, damping = self.meta["preconditioner"], Damping(**self.meta["damping"])
        kind = PreconditionerType.parse(kind or PreconditionerType.AUTO, "preconditioner")
        key = (kind, damping)  # damping None: the (resolved) preconditioner's default
        if key not in self._pre:
            self._pre[key] = preconditioner_of(self.run_dir, self.store, kind, damping)
        return self._pre[key]

    def search(self, queries: Tensor, k: int = 10, preconditioner: PreconditionerType | str | None = None,
               damping: Damping | None = None, largest: bool = True, nprobe: int | None = None,
               rerank: int = 10, batch: int = 64) -> IndexHits:
        """The ``k`` train rows with the largest (``largest=False``: most negative) scores for each
        logged query row (``queries``: ``(n_query, dim)`` as a queries store holds them).

        ``nprobe`` (``ivf*``; default ``max(1, nlist // 64)``) and ``rerank`` (candidates per result,
        scored exactly) trade speed for recall."""
        if k < 1 or rerank < 1:
            raise LogixError(f"k and rerank must be positive integers, got k={k}, rerank={rerank}.")
        if queries.dim() != 2 or queries.shape[1] != self.meta["dim"]:
            raise LogixError(f"Query rows of shape {tuple(queries.shape)} do not match the index's "
                             f"{self.meta['dim']} columns.")
        pq = self._queries(queries, self.preconditioner(preconditioner, damping))
        if not largest:
            pq = -pq
        self._set_search_params(nprobe, k * rerank)
        candidates = min(len(self), k * rerank)
        reduced = pq if self.basis is None else pq @ self.basis
        query = np.zeros((pq.shape[0], self.meta["width"]), np.float32)  # the norm coordinate and padding: 0
        query[:, : reduced.shape[1]] = reduced.numpy()
        _, found = self.faiss_index.search(query, candidates)
        found = torch.from_numpy(found)
        scores, index = [], []
        for lo in range(0, pq.shape[0], batch):
            s, i = self._rerank(pq[lo : lo + batch], found[lo : lo + batch], min(k, candidates))
            scores.append(s if largest else -s)
            index.append(i)
        scores, index = torch.cat(scores), torch.cat(index)
        ids = self.store.ids
        return IndexHits(index, scores, [[ids[j] if j >= 0 else None for j in row] for row in index.tolist()])

    def recall(self, queries: Tensor | None = None, k: int = 10, sample: int = 100, preconditioner=None,
               damping: Damping | None = None, nprobe: int | None = None, rerank: int = 10, seed: int = 0) -> float:
        """Recall@``k`` of :meth:`search` against the exact scan (one pass over the store) for
        ``queries``, by default ``sample`` rows drawn from the run's logged queries (else from its
        train rows): whether this kind suits these rows (inverted files need rows that cluster,
        graphs rows that do not; both are measured in ``benchmarks/bench_index.py``)."""
        if queries is None:
            source = self.store
            query_dir = store_dir(self.run_dir, QUERY_STORE)
            if (query_dir / "manifest.json").exists() and Store(query_dir).n_rows:
                source = Store(query_dir)
            pick = np.random.default_rng(seed).choice(source.n_rows, size=min(sample, source.n_rows), replace=False)
            queries = source.take(np.sort(pick))
        hits = self.search(queries, k, preconditioner, damping, nprobe=nprobe, rerank=rerank)
        pq = self._queries(queries, self.preconditioner(preconditioner, damping)).to(torch.float32)
        best = exact_top(self.store, pq, self.mode, self.norms, min(k, len(self)))
        found = [set(row) for row in hits.index.tolist()]
        return float(np.mean([len(f & set(e)) / len(e) for f, e in zip(found, best.tolist())]))

    def _queries(self, queries: Tensor, pre: Preconditioner) -> Tensor:
        q = queries.to(torch.float64)
        if self.mode is ScoreMode.UNIT:
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
        pq = pre(q)
        if self.mode is ScoreMode.COSINE:
            pq = pq / (pq * q).sum(1, keepdim=True).clamp_min(1e-300).sqrt()
        return pq

    def _set_search_params(self, nprobe: int | None, wanted: int) -> None:
        faiss = load_faiss()
        if self.kind in INVERTED:
            ivf = faiss.extract_index_ivf(self.faiss_index)
            ivf.nprobe = min(ivf.nlist, nprobe or max(1, ivf.nlist // 64))
        elif self.kind in GRAPHS:
            self.faiss_index.hnsw.efSearch = max(wanted, 64)

    def _rerank(self, pq: Tensor, found: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact scores of each query's candidates (from the store's rows) and the best ``k``: one
        float32 dot product per candidate (as the scan's GEMM), kept in float64."""
        valid = found >= 0
        unique, where = torch.unique(found.clamp_min(0), return_inverse=True)
        rows = self.store.take(unique.numpy()).to(torch.float32)
        exact = torch.bmm(rows[where], pq.to(torch.float32).unsqueeze(2)).squeeze(2).to(torch.float64)
        divisors = row_divisors(self.mode, rows, None if self.norms is None else self.norms[unique])
        if divisors is not None:
            exact /= divisors[where]
        exact = exact.masked_fill(~valid, -math.inf)
        top, pos = exact.topk(k, dim=1)
        index = found.gather(1, pos).masked_fill(torch.isinf(top), -1)
        return top.masked_fill(torch.isinf(top), math.nan), index

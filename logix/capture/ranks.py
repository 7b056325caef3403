"""What a run does only under ``torch.distributed``: statistics summed over ranks, ids checked
across ranks, the statistics of ranks an earlier session had, and the projections compared."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from logix.config import DuplicatePolicy
from logix.core.distributed import Dist
from logix.core.projection import ModuleProjection
from logix.core.statistics import Statistics
from logix.errors import DuplicateIdError
from logix.store import Store
from logix.store.format import manifest_ranks, read_manifest, read_rank_manifest
from logix.store.writer import drop_rows

log = logging.getLogger("logix")


def projection_digest(names: list[str], projections: dict[str, ModuleProjection]) -> list:
    """A cheap fingerprint of the projections (equal on every rank of a distributed run)."""
    out = []
    for name in names:
        proj = projections.get(name)  # none yet before a PCA run's covariance pass
        for p in () if proj is None else (proj.p_in, proj.p_out):
            out.append(None if p is None else (tuple(p.shape), round(float(p.double().sum()), 6),
                                               round(float(p.double().abs().sum()), 6)))
    return out


def reduce_statistics(
    dist: Dist, stats: Statistics | None, base: dict[str, Tensor] | None, accum_dtype: torch.dtype
) -> Statistics:
    """``base`` plus the sum over ranks of what each rank added to it in this pass.

    ``base`` (the statistics carried into the pass, equal on every rank) is not summed
    again; keys no rank changed keep their exact values. Ranks that saw no data take part
    with zeros."""
    base = base or {}
    local = stats.flat() if stats is not None else {}
    meta = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), k not in base or not torch.equal(v, base[k]))
            for k, v in local.items()}
    merged: dict[str, tuple] = {}
    for rank_meta in dist.all_gather_object(meta):
        for k, (shape, dtype, changed) in rank_meta.items():
            old = merged.get(k)
            merged[k] = (shape, dtype, changed or (old is not None and old[2]))
    out = {k: v.clone() for k, v in base.items()}
    by_dtype: dict[str, list[str]] = {}
    for k in sorted(merged):
        if merged[k][2]:
            by_dtype.setdefault(merged[k][1], []).append(k)
    for dtype_name, keys in by_dtype.items():
        dtype = getattr(torch, dtype_name)
        parts = []
        for k in keys:
            shape = merged[k][0]
            if k in local:
                v = local[k].to(dtype)
                parts.append((v - base[k].to(dtype) if k in base else v).reshape(-1))
            else:
                parts.append(torch.zeros(int(np.prod(shape)), dtype=dtype))
        total = dist.all_reduce_sum(torch.cat(parts))
        at = 0
        for k in keys:
            shape = merged[k][0]
            n = int(np.prod(shape))  # 1 for a scalar (shape ())
            delta = total[at : at + n].reshape(shape)
            at += n
            out[k] = base[k] + delta if k in base else delta
    return Statistics.from_flat(out) if out else Statistics(accum_dtype)


def check_rank_duplicates(dist: Dist, directory: Path, store: str, policy: DuplicatePolicy) -> None:
    """Ids committed by more than one rank: an error, or (``store.duplicate_ids: skip``)
    each rank but the lowest drops its copy from its own shards."""
    if not dist.active:
        return
    dist.barrier()  # every rank's shards are committed

    def find() -> dict[int, list]:
        if read_manifest(directory) is None:
            return {}
        owners: dict[object, int] = {}
        drop: dict[int, set] = {}
        st = Store(directory, check_duplicates=False)
        rank_of_row = np.repeat([sh.get("rank", 0) for sh in st.manifest["shards"]], st.shard_rows)
        for key, rank in zip(st.ids, rank_of_row.tolist()):
            owner = owners.setdefault(key, rank)
            if owner != rank:
                drop.setdefault(rank, set()).add(key)
        drop = {r: sorted(v, key=str) for r, v in drop.items()}
        if drop and policy is DuplicatePolicy.ERROR:
            examples = [k for ks in drop.values() for k in ks][:5]
            n = sum(len(v) for v in drop.values())
            raise DuplicateIdError(
                f"{n} ids of the {store} store were logged by more than one rank (e.g. {examples}); "
                "the rows stay committed, and the store cannot be read until they are dropped (resume with "
                "store.duplicate_ids=skip). A DistributedSampler repeats examples to give every rank "
                "as many: split the data with logix.core.distributed.shard_indices (as extract() and the "
                "Trainer callback do) or drop_last=True, or set store.duplicate_ids=skip to keep the "
                "lowest rank's row."
            )
        return drop

    drop = dist.on_main(find)
    mine = drop.get(dist.rank, [])
    if mine:
        per_token = read_manifest(directory)["per_token"]
        drop_rows(directory, dist.rank, set(mine), per_token)
        log.warning(
            "logix: rank %d dropped %d rows whose ids another rank also logged (store.duplicate_ids=skip); "
            "the statistics of this pass include those examples once per rank that logged them",
            dist.rank, len(mine),
        )
    dist.barrier()


def adopt_orphan_states(
    dist: Dist, directory: Path, stats: Statistics, base: dict[str, Tensor] | None
) -> Statistics:
    """``stats`` with the running statistics of ranks that an earlier, larger distributed session
    had and this one lacks folded in, so the statistics still describe every committed row."""
    base = base or {}
    for rank in manifest_ranks(directory):
        if rank < dist.world_size:
            continue
        manifest = read_rank_manifest(directory, rank)
        if not manifest or not manifest.get("state"):
            continue
        orphan = Statistics.load(directory / manifest["state"]).flat()
        delta = {k: v - base[k] if k in base else v for k, v in orphan.items()}
        log.info("logix: adopting the statistics of rank %d of an earlier session", rank)
        stats = Statistics.from_flat(add_flat(stats.flat(), delta))
    return stats


def add_flat(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {k: v.clone() for k, v in a.items()}
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out

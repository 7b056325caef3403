"""EK-FAC corrections from the stored rows, after the log pass (no pass over the data before it).

EK-FAC replaces KFAC's eigenvalues ``lambda_S[i] lambda_A[j]`` by the second moments of the
per-example gradients in the Kronecker eigenbasis, ``E[(q_S_i^T G q_A_j)^2]`` (George et al.,
2018). The rows the log pass stores *are* those per-example gradients (projected, ``k_out x
k_in`` per module), so once the pass has accumulated ``A`` and ``S`` and they are
eigendecomposed, one streaming read of the train store (each rank its own rows) gives the same sums the two-pass plan
(a KFAC pass, then the log pass rotating each gradient as it goes) computes, without running the
model over the data a second time. Quantized rows (``int8`` / ``int4``) give the corrections of
their dequantized values.
"""

from __future__ import annotations

import torch

from logix.core.distributed import Dist
from logix.core.statistics import Statistics, eigendecompose
from logix.store import Store


def ekfac_from_store(stats: Statistics, store: Store, modules: list[str], dist: Dist, dtype: torch.dtype,
                     chunk_rows: int = 4096) -> None:
    """Eigendecompose ``stats``' ``A`` and ``S`` (rank 0's bases, sent to every rank) and add
    ``ekfac`` (the per-coordinate second moments' sums in those bases) from every row of ``store``.

    Under ``torch.distributed`` each rank reads the rows its own writer committed (a contiguous
    range of the one logical store) and the sums are all-reduced, so no rank reads the whole store.
    ``stats`` must hold the example count the corrections are divided by. A per-token store is not
    supported (rows are tokens there).
    """
    def bases() -> dict[tuple[str, str], torch.Tensor]:
        eigendecompose(stats, modules)
        return {(m, k): stats.raw_sum(m, k) for m in modules for k in ("A_evals", "A_evecs", "S_evals", "S_evecs")}

    for (module, key), value in dist.on_main(bases).items():
        stats.set(module, key, value)
    lo, hi = rank_rows(store, dist.rank) if dist.active else (0, store.n_rows)
    blocks = store.layout.blocks
    q = {b.name: (stats.raw_sum(b.name, "S_evecs").to(dtype), stats.raw_sum(b.name, "A_evecs").to(dtype))
         for b in blocks}
    sums = {b.name: torch.zeros(b.shape, dtype=dtype) for b in blocks}
    if hi > lo:
        for chunk in store.iter_chunks(chunk_rows, start=lo, stop=hi):
            rows = chunk.rows
            for b in blocks:
                q_s, q_a = q[b.name]
                g = rows[:, b.columns].to(dtype).reshape(-1, *b.shape)  # (n, k_out, k_in)
                sums[b.name] += ((q_s.T @ g @ q_a) ** 2).sum(0)
    for name, value in sums.items():
        stats.add(name, "ekfac", dist.all_reduce_sum(value) if dist.active else value)


def rank_rows(store: Store, rank: int) -> tuple[int, int]:
    """The global row range of the shards writer ``rank`` committed (shards come in rank order)."""
    lo = hi = 0
    for entry, rows in zip(store.manifest["shards"], store.shard_rows):
        owner = entry.get("rank", 0)
        if owner < rank:
            lo += rows
        if owner <= rank:
            hi += rows
    return lo, hi

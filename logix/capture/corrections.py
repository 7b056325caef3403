"""EK-FAC corrections from the stored rows, after the log pass (no pass over the data before it).

EK-FAC replaces KFAC's eigenvalues ``lambda_S[i] lambda_A[j]`` by the second moments of the
per-example gradients in the Kronecker eigenbasis, ``E[(q_S_i^T G q_A_j)^2]`` (George et al.,
2018). The rows the log pass stores *are* those per-example gradients (projected, ``k_out x
k_in`` per module), so once the pass has accumulated ``A`` and ``S`` and they are
eigendecomposed, one streaming read of the train store gives the same sums the two-pass plan
(a KFAC pass, then the log pass rotating each gradient as it goes) computes, without running the
model over the data a second time. Quantized rows (``int8`` / ``int4``) give the corrections of
their dequantized values.
"""

from __future__ import annotations

import torch

from logix.core.statistics import Statistics
from logix.store import Store


def ekfac_from_store(stats: Statistics, store: Store, dtype: torch.dtype, chunk_rows: int = 4096) -> None:
    """Add ``ekfac`` (the per-coordinate second moments' sums in the eigenbasis of each module's
    ``A`` and ``S``) to ``stats`` from every row of ``store``.

    ``stats`` must hold the modules' eigenbases (``A_evecs``, ``S_evecs``) and the example count
    the corrections are divided by. A per-token store is not supported (rows are tokens there).
    """
    blocks = store.layout.blocks
    bases = {b.name: (stats.raw_sum(b.name, "S_evecs").to(dtype), stats.raw_sum(b.name, "A_evecs").to(dtype))
             for b in blocks}
    sums = {b.name: torch.zeros(b.shape, dtype=dtype) for b in blocks}
    for chunk in store.iter_chunks(chunk_rows):
        rows = chunk.rows
        for b in blocks:
            q_s, q_a = bases[b.name]
            g = rows[:, b.columns].to(dtype).reshape(-1, *b.shape)  # (n, k_out, k_in)
            sums[b.name] += ((q_s.T @ g @ q_a) ** 2).sum(0)
    for name, value in sums.items():
        stats.add(name, "ekfac", value)

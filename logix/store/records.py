"""Small side stores read whole: every committed row by id, in float64.

The generic :class:`~logix.store.reader.Store` hands out gradient rows (float32 / float16 /
bfloat16 / quantized); a store of a few float64 numbers per id (the in-context pass's logged
likelihoods) is read here, from the shards its manifest names only.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from logix.store.format import read_manifest


def committed_rows(directory: str | Path) -> dict[str, np.ndarray]:
    """``{id: row}`` of every committed row (shards named in the manifest only), ids as str, rows in float64.

    An absent store reads as ``{}``.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return {}
    out: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        with h5py.File(directory / shard["file"], "r") as fh:
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in fh["ids"][()]]
            out.update(zip(ids, np.asarray(fh["rows"][()], dtype=np.float64)))
    return out

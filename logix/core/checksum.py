"""Checksummed safetensors files: statistics, projections and the state saved with a shard.

:func:`save_tensors` records an xxh3-128 hash of the tensors (every name, dtype, shape and
byte, in name order) in the file's safetensors metadata under :data:`HASH_KEY`;
:func:`load_tensors` recomputes it and refuses a file whose tensors do not match, a file
without the hash, and a file safetensors cannot parse, with a :class:`~logix.errors.StoreError`
that names the file. The hash runs at about memory speed (xxh3), far below the cost of reading
the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from logix.errors import StoreError

HASH_KEY = "logix.xxh3_128"
FIX = "Re-log the run (or restore the file from a backup)."


def damaged(path: str | Path, problem: str) -> StoreError:
    """The error of a damaged file: which file, what failed, and the fix."""
    return StoreError(f"Damaged file {path}: {problem}. {FIX}")


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, as stored in a safetensors file."""
    flat = tensor.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


def digest_tensors(tensors: dict[str, Tensor]) -> str:
    """xxh3-128 (hex) of ``tensors``: names, dtypes, shapes and bytes, in name order."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu()
        h.update(f"{name}\0{str(tensor.dtype)}\0{list(tensor.shape)}\0".encode())
        h.update(tensor_bytes(tensor))
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` with their hash in its metadata (the
    caller writes to a temporary name and renames it into place)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**(metadata or {}), HASH_KEY: digest_tensors(tensors)})


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a file :func:`save_tensors` wrote, verified against the hash it recorded."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            recorded = (fh.metadata() or {}).get(HASH_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except FileNotFoundError:
        raise StoreError(f"Missing file {path}. {FIX}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise damaged(path, f"not a readable safetensors file ({exc})") from exc
    if recorded is None:
        raise damaged(path, f"no {HASH_KEY} checksum in its metadata (not written by this version of logix)")
    actual = digest_tensors(tensors)
    if actual != recorded:
        raise damaged(path, f"its tensors do not match their checksum (xxh3-128 {actual}, recorded {recorded})")
    return tensors

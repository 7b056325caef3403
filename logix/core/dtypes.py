"""Every dtype table in one place: names (config values, manifest entries) to torch dtypes, and the
numpy layouts of a store's rows."""

from __future__ import annotations

import numpy as np
import torch

from logix.errors import ConfigError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Quantized store dtypes: their rows go in and come out as float32 (logix.store.quant).
QUANTIZED_DTYPES = ("int8", "int4")

# How the rows of a store of each (unquantized) dtype lie in a shard file.
# (float64: stores logix writes for itself, as the in-context pass's logs; not a config choice)
DISK_DTYPES: dict[str, str] = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2"}
# Rows as a store hands them out, as numpy arrays (bfloat16 as its bits; quantized stores
# dequantize to float32).
HOST_DTYPES: dict[str, type] = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.int16,
                                "int8": np.float32, "int4": np.float32}


def torch_dtype(name: object) -> torch.dtype:
    """The torch dtype called ``name`` (a string or a config enum such as ``ComputeDtype``)."""
    key = getattr(name, "value", name)
    if key not in TORCH_DTYPES:
        raise ConfigError(f"Unknown dtype: {key!r}. Choose between {sorted(TORCH_DTYPES)}.")
    return TORCH_DTYPES[key]


def row_dtype(name: object) -> torch.dtype:
    """The dtype of the rows a store of dtype ``name`` takes in and hands out (quantized stores,
    ``int8`` / ``int4``, take and give float32 rows; see :mod:`logix.store.quant`)."""
    key = getattr(name, "value", name)
    return torch.float32 if key in QUANTIZED_DTYPES else torch_dtype(key)

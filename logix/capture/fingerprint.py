"""Which state of the model a run directory's rows describe, so that no run mixes two models.

``model.json`` in a run directory records a fingerprint of the model the rows were logged with:
written at the first block a process logs and updated when it commits (``finalize`` /
``close``), so it names the state the latest rows came from -- also when a training loop logs
while the weights move. A later session that opens the directory (a re-run of the script, a
new ``logix.init`` in a notebook, the Trainer callback resuming a checkpoint) checks its model
against it before it adds rows or queries, or before ``run.plan()`` declares the run complete:
a different state is an error naming the fix (a new project, ``overwrite=True``, or
``resume=True`` to continue on purpose), never rows of two models scored together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from logix.core.distributed import Dist
from logix.errors import RunDirectoryError
from logix.store.format import write_json_atomic
from logix.store.rundir import model_file


def model_fingerprint(model: nn.Module, sample: int = 4096) -> str:
    """A hash of the model's parameters (names, shapes and a strided sample of each one's values).

    Training moves (nearly) every weight, so two states of a model differ in their fingerprint;
    the sample keeps the cost negligible for large models (a few ms for a 1B-parameter model).

    Args:
        model: the model (a DDP / compile wrapper hashes like the model inside only if unwrapped).
        sample: values hashed per parameter tensor (evenly strided).

    Returns:
        A 32-character hex digest.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        local = getattr(param, "to_local", None)  # an FSDP2 DTensor: this rank's shard (rank 0's is recorded)
        values = (local() if callable(local) else param).detach().flatten()
        values = values[:: max(1, values.numel() // sample)][:sample]
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(values.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()


class ModelGuard:
    """The model-state check of one session of a run directory.

    Args:
        run_dir: the run directory.
        dist: the process group (rank 0 reads and writes ``model.json``).
        resume: continue a directory whose rows came from another model state (no check).
    """

    def __init__(self, run_dir: Path, dist: Dist, resume: bool = False) -> None:
        self.path = model_file(run_dir)
        self.dir = Path(run_dir)
        self.dist = dist
        self.resume = resume
        self.model: nn.Module | None = None
        self.checked = False

    def watch(self, model: nn.Module) -> None:
        """The model this session logs with (checked at its first block)."""
        self.model = model
        self.checked = False

    def check(self, model: nn.Module | None = None) -> None:
        """Before this session's first row, query or completed plan: refuse another model state.

        Records the fingerprint when the directory has none yet. Once per session (the weights
        may then move, e.g. when logging while training).

        Raises:
            RunDirectoryError: the directory's rows were logged with another state of the model.
        """
        model = model if model is not None else self.model
        if self.checked or model is None:
            return
        fingerprint = model_fingerprint(model)
        self.dist.on_main(lambda: self._check(fingerprint))
        self.checked = True

    def record(self) -> None:
        """Note the state the rows committed now come from (at ``finalize`` / ``close``)."""
        if self.model is None or not self.checked:
            return
        fingerprint = model_fingerprint(self.model)
        self.dist.on_main(lambda: write_json_atomic(self.path, {"fingerprint": fingerprint}))

    def _check(self, fingerprint: str) -> None:
        if not self.path.exists() or self.resume:
            write_json_atomic(self.path, {"fingerprint": fingerprint})
            return
        if json.loads(self.path.read_text()).get("fingerprint") != fingerprint:
            raise RunDirectoryError(
                f"{self.dir} was logged with another state of the model (its weights differ from this "
                "model's), so its rows do not describe this model and scores would mix two models. Use "
                "another project name, overwrite=True (--overwrite) to delete the old logs, or "
                "resume=True to add to them on purpose (e.g. logging while training, after a restart)."
            )

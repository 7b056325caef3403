"""Choosing the preconditioner and damping of one's own task by LDS against retrained models.

No setting is best on every task (docs/influence.md: per-module ``raw`` covariance is far ahead of
EK-FAC on classifiers and behind on a tiny GPT-2; some models want almost no damping, others the
mean eigenvalue), so the defaults are the best worst case over a suite of tasks. Where retraining
a model (or a small proxy of it) some tens of times is affordable, :func:`damping_sweep` picks the
setting on the task itself: it scores the logged queries with each preconditioner at each damping
and reports the LDS of each against the retrained models' outputs
(:func:`~logix.analysis.retrain_on_subsets`'s ground truth, whose cache file the CLI's
``logix damping`` reads).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from logix.analysis.checkpoints import load_checkpoint
from logix.analysis.evaluate import LDSResult, lds
from logix.analysis.influence import compute_influence
from logix.config.choices import PreconditionerType, ScoreMode
from logix.config.damping import Damping, describe_damping
from logix.errors import LogixError
from logix.store.rundir import scores_file
from logix.store.scores import read_score_matrix

SWEEP_DAMPINGS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Relative dampings :func:`damping_sweep` tries by default (the suite's optima span them: EK-FAC
0.001-1, ``raw`` 0.3-3)."""


@dataclass
class DampingSweep:
    """The LDS of a run's scores at each preconditioner and damping, as :func:`damping_sweep`
    returns it: parallel lists, one entry per setting scored.

    Attributes:
        preconditioners: The preconditioner of each entry (``auto`` resolved to the run's).
        dampings: The damping of each entry.
        results: The :class:`~logix.analysis.LDSResult` of each entry.
    """

    preconditioners: list[str]
    dampings: list[Damping]
    results: list[LDSResult]

    @property
    def means(self) -> list[float]:
        """The LDS (mean over queries) of each entry."""
        return [r.mean for r in self.results]

    @property
    def best_index(self) -> int:
        """The entry of the highest LDS (the first of equals)."""
        return int(np.nanargmax(self.means))

    @property
    def best(self) -> Damping:
        """The damping of the best entry."""
        return self.dampings[self.best_index]

    @property
    def best_preconditioner(self) -> str:
        """The preconditioner of the best entry."""
        return self.preconditioners[self.best_index]

    @property
    def best_kwargs(self) -> dict:
        """``preconditioner`` and ``damping`` of the best entry, for ``influence(run_dir, **best_kwargs)``."""
        return {"preconditioner": self.best_preconditioner, "damping": self.best}

    def to_records(self) -> list[dict]:
        """One dict per entry: ``preconditioner``, ``damping`` (as text), ``value``, ``relative``,
        ``lds``, ``best``."""
        best = self.best_index
        return [{"preconditioner": p, "damping": describe_damping(d), "value": d.value, "relative": d.relative,
                 "lds": r.mean, "best": i == best}
                for i, (p, d, r) in enumerate(zip(self.preconditioners, self.dampings, self.results))]

    def __str__(self) -> str:
        lines = [f"{'preconditioner':<16}{'damping':<16}{'LDS':>8}"]
        lines += [f"{rec['preconditioner']:<16}{rec['damping']:<16}{rec['lds']:>8.3f}"
                  f"{'  <- best' if rec['best'] else ''}" for rec in self.to_records()]
        return "\n".join(lines)


def _columns(store, train_ids: Sequence | None, n_columns: int) -> np.ndarray:
    """The store row of each mask column."""
    ids = list(range(n_columns)) if train_ids is None else list(train_ids)
    if len(ids) != n_columns:
        raise LogixError(f"{len(ids)} train_ids for masks over {n_columns} train examples: give one id per mask column.")
    try:
        return np.array([store.index_of(i) for i in ids], dtype=np.int64)
    except KeyError as exc:
        hint = ("the masks' columns are taken as ids 0..n-1: pass train_ids=[the id of each column]"
                if train_ids is None else "train_ids must be ids the run logged")
        raise LogixError(f"{exc.args[0]} ({hint}).") from None


def damping_sweep(
    run_dir: str | Path,
    masks: np.ndarray,
    outputs: np.ndarray,
    dampings: Sequence[Damping | float] = SWEEP_DAMPINGS,
    preconditioner: PreconditionerType | str | Sequence[PreconditionerType | str] = PreconditionerType.AUTO,
    train_ids: Sequence | None = None,
    mode: ScoreMode | str = ScoreMode.DOT,
    memory_budget_mb: float = 512.0,
    progress: bool = True,
) -> DampingSweep:
    """Score a run's logged queries at each preconditioner and damping and measure each by LDS.

    Args:
        run_dir: A finalized run with train rows and logged queries.
        masks: ``(n_subsets, n_train)`` subsets the models were retrained on
            (:func:`~logix.analysis.retrain_on_subsets`).
        outputs: ``(n_subsets, n_query)`` the retrained models' outputs for the logged queries, in
            the order the queries were logged.
        dampings: :class:`~logix.config.Damping` values, or numbers (relative dampings).
        preconditioner: One preconditioner as for :func:`~logix.analysis.influence`, or several
            (e.g. ``["ekfac", "raw"]``: every one is scored at every damping; each needs the
            statistics the run logged for it).
        train_ids: The run's id of each mask column (default: column ``j`` is id ``j``); the run
            may hold more rows than the masks cover.
        mode: The score mode (``dot`` is influence).
        memory_budget_mb: Memory the scorer may use per pass over the train rows.
        progress: Show a progress bar over the settings.

    Returns:
        A :class:`DampingSweep`: the LDS of each setting and the best of them.

    Raises:
        LogixError: The masks, outputs or ids do not match the run (the message names which),
            or no damping or preconditioner was given.
        StatisticsError: The run did not log what a preconditioner needs (the message names the setting).
        ConfigError: A damping is not a finite number >= 0, or a preconditioner is unknown.
    """
    dampings = [d if isinstance(d, Damping) else Damping(d) for d in dampings]
    kinds = [preconditioner] if isinstance(preconditioner, (str, PreconditionerType)) else list(preconditioner)
    if not dampings or not kinds:
        raise LogixError("damping_sweep needs at least one damping and one preconditioner.")
    kinds = [PreconditionerType.parse(k, "preconditioner") for k in kinds]
    masks, outputs = np.asarray(masks, dtype=bool), np.asarray(outputs, dtype=np.float64)
    if masks.ndim != 2 or outputs.ndim != 2 or outputs.shape[0] != masks.shape[0]:
        raise LogixError(f"masks {masks.shape} and outputs {outputs.shape} must be (n_subsets, n_train) and "
                         "(n_subsets, n_query), one row per retrained model.")
    sweep, columns = DampingSweep([], [], []), None
    settings = [(k, d) for k in kinds for d in dampings]
    with tempfile.TemporaryDirectory(prefix="logix-damping-") as tmp:
        for kind, damping in tqdm(settings, desc="settings", disable=not progress):
            cp = load_checkpoint(run_dir, kind, damping)
            if columns is None:
                columns = _columns(cp.train, train_ids, masks.shape[1])
                if outputs.shape[1] != cp.queries.shape[0]:
                    raise LogixError(f"outputs has {outputs.shape[1]} columns but {run_dir} logged "
                                     f"{cp.queries.shape[0]} queries: one output per logged query, in logging order.")
            path = scores_file(tmp)
            compute_influence(cp, mode=mode, top_k=1, scores_path=path, self_influence=False, progress=False,
                              memory_budget_mb=memory_budget_mb)
            sweep.preconditioners.append(cp.preconditioner.kind.value)
            sweep.dampings.append(damping)
            sweep.results.append(lds(read_score_matrix(path)[:, columns], masks, outputs))
    return sweep

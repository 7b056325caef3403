"""kronfluence (1.0.1) EK-FAC scores for a ``suite_tasks.Task``, side by side with logix.

The model is a copy (``task.kron_model``: GPT-2's ``Conv1D`` layers become ``nn.Linear``, the same
function), the factors are fitted on the train set with kronfluence's defaults (EK-FAC, labels
sampled from the model: the true Fisher) unless ``empirical``, and the pairwise scores use
``task.loss`` for both the train loss and the measurement (the summed query loss), so a positive
score means "helps the query", as in logix. ``damping``: kronfluence's ``damping_factor``
(absolute; ``None`` is its heuristic, 0.1 x the mean eigenvalue; its default is 1e-8).

    pip install --no-deps kronfluence==1.0.1 einops einconv opt_einsum   # (its torch pin would upgrade torch)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset


class _Ids(Dataset):
    def __init__(self, n: int, offset: int = 0):
        self.n, self.offset = n, offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i + self.offset


def kron_scores(task, model, tmp: Path, dampings: tuple, empirical: bool = False, batch: int = 64) -> dict:
    """``{"scores": {damping: (n_query, n_train)}, "fit_s", "score_s"}`` from kronfluence EK-FAC."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    logging.getLogger("kronfluence").setLevel(logging.ERROR)
    n = task.n_train
    gen = torch.Generator().manual_seed(0)

    def split(batch_ids):  # ids >= n_train are queries
        ids = torch.as_tensor(batch_ids)
        return (ids - n, True) if bool((ids >= n).all()) else (ids, False)

    class KronTask(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            ids, query = split(batch)
            return task.loss(model, ids, query, {"generator": gen} if sample else {})

        def compute_measurement(self, batch, model):
            ids, query = split(batch)
            return task.loss(model, ids, query)

        def get_influence_tracked_modules(self):
            return task.kron_modules

    ktask = KronTask()
    kmodel = prepare_model(task.kron_model(model).eval(), ktask)
    analyzer = Analyzer(f"{task.name}-kron", kmodel, ktask, cpu=True, disable_tqdm=True, disable_model_save=True,
                        output_dir=str(tmp / "kron"))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical)
    start = time.perf_counter()
    analyzer.fit_all_factors("ekfac", _Ids(n), per_device_batch_size=batch, factor_args=factor_args,
                             overwrite_output_dir=True)
    fit_s = time.perf_counter() - start
    out, score_s = {}, {}
    for d in dampings:
        start = time.perf_counter()
        name = f"scores-{d}"
        analyzer.compute_pairwise_scores(name, "ekfac", _Ids(task.n_query, n), _Ids(n),
                                         per_device_query_batch_size=batch, per_device_train_batch_size=batch,
                                         score_args=ScoreArguments(damping_factor=d), overwrite_output_dir=True)
        out[d] = analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()
        score_s[d] = time.perf_counter() - start
    return {"scores": out, "fit_s": fit_s, "score_s": score_s}

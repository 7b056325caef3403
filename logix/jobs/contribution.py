"""``logix contribute``: score a pool of instruction samples, fit a selector, select and export a subset.

    job = ContributionJob.from_yaml("configs/contribution.yaml")
    result = job.run()
    print(result.summary())

What a job does, as its ``contribution`` section says (``model`` and ``data`` sections as in ``logix run``):

1. Loads the model and tokenizer, and the pool (``contribution.pool``, default ``data.train``).
   With ``warmup_epochs > 0`` the model is first fine-tuned on the pool (the offline demo builds a
   seeded model that knows nothing otherwise).
2. Probes (the assessment set of ``icl``, the validation subtasks of ``less``, by category): the
   records of ``contribution.probes`` or ``data.queries``, else a stratified sample of the pool that
   is then removed from the candidates.
3. Model-based scores on a sample of the candidates (``sample_size``, stratified; all by default):
   ``icl`` (in-context contribution), ``ifd``; ``less`` scores every candidate (it is linear in the
   pool). The ``length`` and ``random`` baselines score every candidate.
4. When the sample is smaller than the pool and ``selector`` is not ``none``: a selector learns the
   chosen score from the sample and scores every candidate (column ``selector``); its held-out
   Spearman / AUC go in the summary.
5. Selects the top ``top_p`` / ``top_k`` and writes ``<dir>/selection/selected.jsonl`` (the records as
   read), ``summary.json`` and ``scores.jsonl``; ``<dir>/scores.jsonl`` holds every score.

The project directory also holds ``job.yaml`` (replay with ``logix contribute <dir>/job.yaml``), the
crash-safe logs of each scorer (``icl/``, ``embeddings/``, ``less/``), which a re-run resumes from.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logix.config.choices import ContributionMethod, SelectorHead
from logix.contribution.assessment import assessment_set
from logix.contribution.embeddings import embed_records
from logix.contribution.lora_selector import LoraSelector
from logix.contribution.methods import MethodInputs, baselines, category_key, method_spec, selectable
from logix.contribution.pool import Pool, load_pool
from logix.contribution.scores import ScoreTable
from logix.contribution.selection import Selection, export_selection, format_summary, select
from logix.contribution.selector import Selector, fit_selector
from logix.data import PadCollator
from logix.data.build import build_tokenizer, resolve_path
from logix.errors import ConfigError
from logix.integrations.models import build_model
from logix.jobs.attribution import AttributionJob, training_arguments
from logix.store.rundir import (
    EMBEDDINGS_DIR,
    WARMUP_DIR,
    contribution_scores_file,
    probes_file,
    selection_dir,
)


@dataclass
class ContributionResult:
    """What a contribution job produced.

    Attributes:
        dir: The project directory.
        table: Every score of every candidate (``scores.jsonl``).
        selection: The selected subset.
        paths: The exported files (``subset``, ``summary``, ``scores``).
        selector: The selector's held-out report and settings, when one was fitted.
        seconds: Wall time of each step.
    """

    dir: Path
    table: ScoreTable
    selection: Selection
    paths: dict[str, Path]
    selector: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"logix contribute: {self.dir}", format_summary(self.selection.summary)]
        if self.selector:
            lines.append(f"  selector ({self.selector['head']}): held-out spearman {self.selector['spearman']:+.3f}, "
                         f"AUC {self.selector['auc']:.3f} ({self.selector['n_holdout']} held out)")
        lines.append(f"  subset: {self.paths['subset']}")
        return "\n".join(lines)


class ContributionJob(AttributionJob):
    """Model, pool, scores, selector and selection, as ``config.contribution`` says: ``logix contribute``.

    ``ContributionJob.from_yaml("configs/contribution.yaml").run()`` loads the model and the pool
    (warming the model up on the pool first with ``warmup_epochs``), takes the probes, scores a
    sample of the candidates with the model-based methods (``icl``, ``ifd``; ``less`` scores every
    candidate) and every candidate with the baselines, lets a selector score the rest of the pool
    when the sample is smaller, then selects the top and exports it. The scorers' logs are
    crash-safe: a re-run resumes from them.

    Args:
        config (Config | dict | str | Path): The job's config, or a YAML path.
        project: The project directory's name under ``config.root``.
        **kwargs (Any): ``config_dir``, ``overwrite`` and ``progress``, as for ``logix run``'s job.
    """

    def __init__(self, config, project: str = "contribution", **kwargs: Any) -> None:
        super().__init__(config, project=project, **kwargs)
        self.cc = self.config.contribution

    # ---- inputs --------------------------------------------------------------------------------
    def _path(self, value: str) -> Path:
        return resolve_path(value, self.config_dir)

    def _pool(self) -> Pool:
        source = self.cc.pool or self.config.data.train
        if not source:
            raise ConfigError("Set contribution.pool (or data.train) to the candidate records file.")
        return load_pool(self._path(source), id_field=self.config.data.id_field)

    def _named(self, pool: Pool) -> list[dict[str, Any]]:
        """Records carrying their pool id under the id field (so every scorer uses the same ids)."""
        key = self.config.data.id_field
        return [{**r, key: i} for r, i in zip(pool.records, pool.ids)]

    def _probes(self, named: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """``(probes, candidates)``."""
        source = self.cc.probes or self.config.data.queries
        if source:
            probes = self._named(load_pool(self._path(source), id_field=self.config.data.id_field))
            return probes, named
        size = min(self.cc.assessment_size, len(named) - 1)
        if size < 1:
            raise ConfigError("The pool is too small to draw probes from; give contribution.probes.")
        probes = [dict(r) for r in assessment_set(named, size, category_key(named, self.config), seed=self.cc.seed)]
        taken = {p[self.config.data.id_field] for p in probes}
        return probes, [r for r in named if r[self.config.data.id_field] not in taken]

    def _sample(self, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        n = self.cc.sample_size
        if not n or n >= len(candidates):
            return candidates
        key = self.config.data.category_field or "category"
        if all(key in r for r in candidates):
            return list(assessment_set(candidates, n, key, seed=self.cc.seed))
        rows = np.sort(np.random.default_rng(self.cc.seed).choice(len(candidates), n, replace=False))
        return [candidates[i] for i in rows]

    # ---- steps ---------------------------------------------------------------------------------
    def _warmup(self, model, tokenizer, records: list[dict[str, Any]]) -> None:
        from transformers import Trainer

        from logix.data import InstructionDataset
        from logix.integrations.progress import show_progress

        dc = self.config.data
        dataset = InstructionDataset(records, tokenizer, dc.max_length, train_on=dc.train_on, id_field=dc.id_field)
        args = training_arguments(self.config.replace(train=dataclasses.replace(
            self.config.train, epochs=float(self.cc.warmup_epochs), max_steps=-1)), self.dir / WARMUP_DIR, self.progress)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id))
        show_progress(trainer, self.progress).train()
        model.eval()

    def _max_length(self) -> int | None:
        return self.cc.max_length or None

    def _selector(self, model, tokenizer, candidates, table: ScoreTable, by: str) -> dict[str, Any]:
        key = self.config.data.id_field
        ids = [r[key] for r in candidates]
        values = table.column(by)
        scored = {table.ids[i]: values[i] for i in np.flatnonzero(~np.isnan(values))}
        if self.cc.selector is SelectorHead.LORA:
            selector = LoraSelector(model, tokenizer, label_top_p=self.cc.label_top_p, seed=self.cc.seed,
                                    max_length=self._max_length() or 256, progress=self.progress)
            features: Any = candidates
        else:
            selector = Selector(self.cc.selector, label_top_p=self.cc.label_top_p, seed=self.cc.seed)
            features = embed_records(model, tokenizer, candidates, ids, pooling=self.cc.pooling,
                                     batch_size=self.cc.batch_size, max_length=self._max_length() or 512,
                                     store_dir=self.dir / EMBEDDINGS_DIR, progress=self.progress)
        start = time.perf_counter()
        result = fit_selector(selector, ids, features, scored, holdout=self.cc.holdout)
        table.add_by_id("selector", result.ids, result.predictions)
        return {**result.report.as_dict(), "trained_on": by, "seconds": time.perf_counter() - start,
                "examples_per_s": len(ids) / max(time.perf_counter() - start, 1e-9)}

    # ---- the job -------------------------------------------------------------------------------
    def _score(self, method: ContributionMethod, inputs: MethodInputs, times: dict[str, float]) -> None:
        start = time.perf_counter()
        method_spec(method).score(inputs)
        times[method.value] = time.perf_counter() - start

    def run(self) -> ContributionResult:  # type: ignore[override]
        """Run the job (resuming the scorers' logs of an earlier run of it).

        Returns:
            The scores, the selection and the files written.
        """
        cc = self.cc
        methods = list(dict.fromkeys(cc.methods))
        model_methods = [m for m in methods if method_spec(m).uses_model]
        late = [m for m in model_methods if method_spec(m).after_selector]  # less: its LoRA warm-up changes the model
        default = model_methods[0] if model_methods else methods[0] if methods else ContributionMethod.LENGTH
        by = cc.select_by.value if cc.select_by else default.value
        if by not in selectable(methods):
            raise ConfigError(f"contribution.select_by={by!r} is not computed; add it to contribution.methods "
                              f"({', '.join(m.value for m in methods)}).")
        self._prepare_dir()
        times: dict[str, float] = {}
        start = time.perf_counter()
        pool = self._pool()
        named = self._named(pool)
        tokenizer = build_tokenizer(self.config, self.config_dir)
        model = build_model(self.config, tokenizer)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        times["setup"] = time.perf_counter() - start
        if cc.warmup_epochs:
            start = time.perf_counter()
            self._warmup(model, tokenizer, named)
            times["warmup"] = time.perf_counter() - start
        model.eval()
        probes, candidates = self._probes(named)
        sample = self._sample(candidates)
        key = self.config.data.id_field
        cand_ids = [r[key] for r in candidates]
        cand_pool = Pool([pool.records[i] for i in (pool.index()[c] for c in cand_ids)], cand_ids,
                         pool.source, pool.format)
        table = ScoreTable(cand_ids)
        inputs = MethodInputs(model, tokenizer, self.config, sample, candidates, probes, table, self.dir, self.progress)
        for method in model_methods:
            if method not in late:
                self._score(method, inputs, times)
        for method in baselines():
            method_spec(method).score(inputs)
        selector_report = None
        chosen = None if by in late else table.column(by)
        if chosen is not None and np.isnan(chosen).any() and cc.selector is not SelectorHead.NONE:
            start = time.perf_counter()
            selector_report = self._selector(model, tokenizer, candidates, table, by)
            times["selector"] = time.perf_counter() - start
        for method in late:
            self._score(method, inputs, times)
        rank_by = "selector" if selector_report else by
        table.save(contribution_scores_file(self.dir))
        selection = select(table, rank_by, top_p=None if cc.top_k else cc.top_p, top_k=cc.top_k or None,
                           pool=cand_pool, category_key=self.config.data.category_field or "category", seed=cc.seed)
        selection.summary.update(probes=len(probes), sample=len(sample), methods=[m.value for m in methods],
                                 seconds=times)
        if selector_report:
            selection.summary["selector"] = selector_report
        paths = export_selection(selection, cand_pool, selection_dir(self.dir))
        probes_file(self.dir).write_text("".join(json.dumps(p, default=str) + "\n" for p in probes))
        return ContributionResult(self.dir, table, selection, paths, selector_report, times)

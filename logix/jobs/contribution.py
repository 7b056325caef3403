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

from logix.contribution.baselines import random_scores, response_length
from logix.contribution.pool import Pool, load_pool
from logix.contribution.scores import ScoreTable
from logix.contribution.selection import Selection, export_selection, format_summary, select
from logix.data import PadCollator
from logix.data.build import build_tokenizer, resolve_path
from logix.errors import ConfigError
from logix.integrations.models import build_model, with_lora
from logix.jobs.attribution import AttributionJob, training_arguments

MODEL_METHODS = ("icl", "ifd", "less")


@dataclass
class ContributionResult:
    """What a contribution job produced."""

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
    """Model, pool, scores, selector and selection, as ``config.contribution`` says (see the module docstring)."""

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
        from logix.contribution.icl import assessment_set

        source = self.cc.probes or self.config.data.queries
        if source:
            probes = self._named(load_pool(self._path(source), id_field=self.config.data.id_field))
            return probes, named
        size = min(self.cc.assessment_size, len(named) - 1)
        if size < 1:
            raise ConfigError("The pool is too small to draw probes from; give contribution.probes.")
        probes = [dict(r) for r in assessment_set(named, size, self._category_key(named), seed=self.cc.seed)]
        taken = {p[self.config.data.id_field] for p in probes}
        return probes, [r for r in named if r[self.config.data.id_field] not in taken]

    def _category_key(self, records: list[dict[str, Any]]) -> str:
        key = self.config.data.category_field or "category"
        if not all(key in r for r in records):
            raise ConfigError(f"Stratified sampling needs a category field in every record; {key!r} is missing. "
                              "Set data.category_field, or give contribution.probes.")
        return key

    def _sample(self, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        n = self.cc.sample_size
        if not n or n >= len(candidates):
            return candidates
        key = self.config.data.category_field or "category"
        if all(key in r for r in candidates):
            from logix.contribution.icl import assessment_set

            return list(assessment_set(candidates, n, key, seed=self.cc.seed))
        rows = np.sort(np.random.default_rng(self.cc.seed).choice(len(candidates), n, replace=False))
        return [candidates[i] for i in rows]

    # ---- steps ---------------------------------------------------------------------------------
    def _warmup(self, model, tokenizer, records: list[dict[str, Any]]) -> None:
        from transformers import Trainer

        from logix.data import InstructionDataset

        dc = self.config.data
        dataset = InstructionDataset(records, tokenizer, dc.max_length, train_on=dc.train_on, id_field=dc.id_field)
        args = training_arguments(self.config.replace(train=dataclasses.replace(
            self.config.train, epochs=float(self.cc.warmup_epochs), max_steps=-1)), self.dir / "warmup", self.progress)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=PadCollator(tokenizer.pad_token_id)).train()
        model.eval()

    def _max_length(self) -> int | None:
        return self.cc.max_length or None

    def _icl(self, model, tokenizer, sample, probes, table: ScoreTable) -> None:
        from logix.contribution.icl import icl_contribution

        res = icl_contribution(model, tokenizer, sample, probes, control=self.cc.icl_control, seed=self.cc.seed,
                               batch_size=self.cc.batch_size, max_length=self._max_length(),
                               run_dir=self.dir, id_field=self.config.data.id_field, progress=self.progress)
        by_str = {str(i): i for i in table.ids}
        ids = [by_str[i] for i in res.ids]
        table.add_by_id("icl", ids, res.score)
        table.add_by_id("icl_share_positive", ids, res.share_positive)
        table.add_by_id("icl_sigmoid", ids, res.sigmoid_score)

    def _ifd(self, model, tokenizer, sample, table: ScoreTable) -> None:
        from logix.contribution.ifd import ifd_scores

        key = self.config.data.id_field
        res = ifd_scores(model, tokenizer, sample, batch_size=self.cc.batch_size, max_length=self._max_length(),
                         progress=self.progress)
        table.add_by_id("ifd", [r[key] for r in sample], res.ifd)

    def _less(self, model, tokenizer, candidates, probes, table: ScoreTable) -> None:
        from logix.contribution.less import less_scores, warmup_and_log
        from logix.data import InstructionDataset

        dc = self.config.data
        if not hasattr(model, "peft_config"):
            lora = dataclasses.replace(self.config.model.lora, enabled=True)
            model = with_lora(model, self.config.replace(model=dataclasses.replace(self.config.model, lora=lora)))
        key = self._category_key(probes)
        tasks: dict[str, list] = {}
        for p in probes:
            tasks.setdefault(str(p[key]), []).append(p)
        collator = PadCollator(tokenizer.pad_token_id)
        dataset = InstructionDataset(candidates, tokenizer, dc.max_length, train_on=dc.train_on, id_field=dc.id_field)
        validation = {t: InstructionDataset(v, tokenizer, dc.max_length, train_on=dc.train_on, id_field=dc.id_field)
                      for t, v in tasks.items()}
        warm = warmup_and_log(model, dataset, validation, collator, fraction=self.cc.less_fraction,
                              epochs=self.cc.less_epochs, lr=self.config.train.lr,
                              batch_size=self.config.train.batch_size, config=self.config, project="less",
                              root=self.dir, seed=self.cc.seed, log_batch_size=self.cc.batch_size, overwrite=False,
                              progress=self.progress)
        res = less_scores(warm.project_dir, progress=self.progress)
        table.add_by_id("less", res.train_ids, res.scores.double().numpy())

    def _selector(self, model, tokenizer, candidates, table: ScoreTable, by: str) -> dict[str, Any]:
        from logix.contribution.selector import LoraSelector, Selector, embed_records, fit_selector

        key = self.config.data.id_field
        ids = [r[key] for r in candidates]
        values = table.column(by)
        scored = {table.ids[i]: values[i] for i in np.flatnonzero(~np.isnan(values))}
        if self.cc.selector == "lora":
            selector = LoraSelector(model, tokenizer, label_top_p=self.cc.label_top_p, seed=self.cc.seed,
                                    max_length=self._max_length() or 256, progress=self.progress)
            features: Any = candidates
        else:
            selector = Selector(self.cc.selector, label_top_p=self.cc.label_top_p, seed=self.cc.seed)
            features = embed_records(model, tokenizer, candidates, ids, pooling=self.cc.pooling,
                                     batch_size=self.cc.batch_size, max_length=self._max_length() or 512,
                                     store_dir=self.dir / "embeddings", progress=self.progress)
        start = time.perf_counter()
        result = fit_selector(selector, ids, features, scored, holdout=self.cc.holdout)
        table.add_by_id("selector", result.ids, result.predictions)
        return {**result.report.as_dict(), "trained_on": by, "seconds": time.perf_counter() - start,
                "examples_per_s": len(ids) / max(time.perf_counter() - start, 1e-9)}

    # ---- the job -------------------------------------------------------------------------------
    def run(self) -> ContributionResult:  # type: ignore[override]
        cc = self.cc
        methods = list(dict.fromkeys(cc.methods))
        model_methods = [m for m in methods if m in MODEL_METHODS]
        by = cc.select_by.value if cc.select_by else (model_methods[0] if model_methods else methods[0] if methods else "length")
        if by not in (*methods, "length", "random", "icl_share_positive", "icl_sigmoid"):
            raise ConfigError(f"contribution.select_by={by!r} is not computed; add it to contribution.methods "
                              f"({', '.join(methods)}).")
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
        for method in model_methods:  # less last: its LoRA warm-up changes the model
            if method == "less":
                continue
            start = time.perf_counter()
            getattr(self, f"_{method}")(model, tokenizer, sample, *([probes] if method == "icl" else []), table)
            times[method] = time.perf_counter() - start
        table.add("length", response_length(candidates, tokenizer))
        table.add("random", random_scores(len(candidates), cc.seed))
        selector_report = None
        chosen = table.column(by) if by != "less" else None
        if chosen is not None and np.isnan(chosen).any() and cc.selector != "none":
            start = time.perf_counter()
            selector_report = self._selector(model, tokenizer, candidates, table, by)
            times["selector"] = time.perf_counter() - start
        if "less" in model_methods:
            start = time.perf_counter()
            self._less(model, tokenizer, candidates, probes, table)
            times["less"] = time.perf_counter() - start
        rank_by = "selector" if selector_report else by
        table.save(self.dir / "scores.jsonl")
        selection = select(table, rank_by, top_p=None if cc.top_k else cc.top_p, top_k=cc.top_k or None,
                           pool=cand_pool, category_key=self.config.data.category_field or "category", seed=cc.seed)
        selection.summary.update(probes=len(probes), sample=len(sample), methods=methods, seconds=times)
        if selector_report:
            selection.summary["selector"] = selector_report
        paths = export_selection(selection, cand_pool, self.dir / "selection")
        (self.dir / "probes.jsonl").write_text("".join(json.dumps(p, default=str) + "\n" for p in probes))
        return ContributionResult(self.dir, table, selection, paths, selector_report, times)

"""What a report shows, read from a logix output directory.

Three kinds of directory are understood:

* an **influence project** (``logix run`` / ``logix influence`` / a Trainer callback project):
  ``influence.jsonl``, ``self_influence.csv``, ``sanity.json`` and, when logged,
  ``per_module.json``;
* a **single run** (``logix.init`` + ``run.log_queries``, no job): influence is computed here
  from its stores (ids only: a bare run keeps no texts);
* a **contribution project** (``logix contribute`` / ``logix select``): ``scores.jsonl``,
  ``selection/summary.json``, ``selection/selected.jsonl``, ``probes.jsonl`` and the pool named
  in ``job.yaml``.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from logix.analysis.records import per_module_records
from logix.config.choices import ChoiceEnum
from logix.errors import LogixError
from logix.store.rundir import (
    CONTRIBUTION_SCORES_FILE,
    PROBES_FILE,
    SELECTED_FILE,
    SELECTION_DIR,
    SUMMARY_FILE,
    checkpoints_file,
    influence_file,
    job_file,
    per_module_file,
    run_file,
    sanity_file,
    scores_file,
    self_influence_file,
)

log = logging.getLogger("logix")


class ReportKind(ChoiceEnum):
    """What a report's directory holds."""

    INFLUENCE = "influence"  # an influence project: influence.jsonl and its companions
    RUN = "run"  # a single run (or a project) without influence.jsonl: scored here from its stores
    CONTRIBUTION = "contribution"  # a contribution project: scores.jsonl, selection/


class ReportError(LogixError, ValueError):
    """The directory holds nothing a report can show."""


@dataclass
class InfluenceData:
    """Influence outputs of a project or run.

    Attributes:
        queries: The ``influence.jsonl`` records, one per query: ``query_id``, ``query_text``,
            ``proponents`` and ``opponents`` (each a list of ``id`` / ``score`` / ``text``).
        self_influence: Train id to self-influence ``g^T H^-1 g`` (``self_influence.csv``), or None.
        sanity: ``sanity.json`` (the share of proponents from the query's own category, against
            random picks), or None.
        per_module: ``per_module.json``: ``{"modules": [...], "queries": [{"query_id", "ids",
            "modules": {module: [part of each proponent's score]}}]}``, or None.
        train_texts: Train id to text, where the texts are available.
        all_scores: The ``(n_query, n_train)`` score matrix when ``scores.h5`` exists, else None.
        notes: What the directory lacks, said plainly (shown at the top of the report).
    """

    queries: list[dict]  # influence.jsonl records: query_id, query_text, proponents, opponents
    self_influence: dict[Any, float] | None = None  # train id -> g^T H^-1 g
    sanity: dict | None = None
    per_module: dict | None = None  # {"modules": [...], "queries": [{"query_id", "modules": {m: [k]}}]}
    train_texts: dict[Any, str] = field(default_factory=dict)
    all_scores: np.ndarray | None = None  # (n_query, n_train) when scores.h5 exists
    notes: list[str] = field(default_factory=list)  # what the directory lacks, said plainly


@dataclass
class ContributionData:
    """Contribution outputs of a project (or a ``logix select --out`` folder).

    Attributes:
        scores: Score name to values aligned with ``ids`` (NaN: not scored), from ``scores.jsonl``.
        ids: The pool's ids, in the order of the score columns.
        summary: The selection's ``summary.json`` (size, categories, response lengths, agreement
            with the other scores), or None.
        selected: The selected records (``selected.jsonl``).
        probes: The assessment probes (``probes.jsonl``) of an in-context contribution project.
        pool: Pool id to record when the pool file is reachable, else None.
        notes: What the directory lacks, said plainly.
    """

    scores: dict[str, np.ndarray]  # score name -> values aligned with ``ids`` (NaN: not scored)
    ids: list
    summary: dict | None = None
    selected: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    pool: dict[Any, dict] | None = None  # id -> record
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    """Everything a report shows about one directory, as :func:`load` reads it.

    Attributes:
        path: The directory.
        kind: What it holds.
        influence: The influence outputs (influence projects and runs), else None.
        contribution: The contribution outputs (contribution projects), else None.
        job: The project's ``job.yaml`` as a dict, when it has one.
    """

    path: Path
    kind: ReportKind
    influence: InfluenceData | None = None
    contribution: ContributionData | None = None
    job: dict | None = None


def load(directory: str | Path | ReportData, *, compute: bool = True, top_k: int = 10) -> ReportData:
    """Read a logix output directory for a report.

    Args:
        directory: an influence project, a single run directory, or a contribution project.
        compute: for a single run without ``influence.jsonl``, score its logged queries here
            (with per-module breakdowns); otherwise such a run is an error.
        top_k: proponents and opponents kept per query when scoring here.

    Returns:
        What the report shows; ``directory`` itself when it is a :class:`ReportData` already.

    Raises:
        ReportError: the directory does not exist or holds no logix outputs.
    """
    if isinstance(directory, ReportData):  # already loaded
        return directory
    path = Path(directory)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory: give a logix project or run directory "
                          "(e.g. logix_runs/quickstart or logix_runs/contribution).")
    job = _read_yaml(job_file(path))
    if influence_file(path).exists():
        return ReportData(path, ReportKind.INFLUENCE, influence=_load_influence(path), job=job)
    if ((path / CONTRIBUTION_SCORES_FILE).exists() or (path / SELECTION_DIR / SUMMARY_FILE).exists()
            or ((path / SUMMARY_FILE).exists() and (path / SELECTED_FILE).exists())):
        return ReportData(path, ReportKind.CONTRIBUTION, contribution=_load_contribution(path, job), job=job)
    if run_file(path).exists() or checkpoints_file(path).exists():
        if not compute:
            raise ReportError(f"{path} holds no influence.jsonl: run `logix influence {path}` first.")
        return ReportData(path, ReportKind.RUN, influence=_compute_influence(path, top_k), job=job)
    raise ReportError(
        f"{path} holds no logix outputs (no influence.jsonl, scores.jsonl, selection/summary.json or "
        "run.json): give the directory `logix run`, `logix influence`, `logix contribute` or logix.init wrote.")


# ---- influence ---------------------------------------------------------------------------------
def _load_influence(path: Path) -> InfluenceData:
    queries = _read_jsonl(influence_file(path))
    data = InfluenceData(queries)
    si = self_influence_file(path)
    if si.exists():
        with open(si, newline="", encoding="utf-8") as fh:
            data.self_influence = {_id(r["id"]): float(r["self_influence"]) for r in csv.DictReader(fh)}
    else:
        data.notes.append("no self_influence.csv (set analysis.self_influence: true): no outlier table.")
    if sanity_file(path).exists():
        data.sanity = json.loads(sanity_file(path).read_text())
    if per_module_file(path).exists():
        data.per_module = json.loads(per_module_file(path).read_text())
    else:
        data.notes.append(f"no per_module.json: `logix influence {path} --per-module` writes the per-module "
                          "breakdown of the proponents' scores.")
    if scores_file(path).exists():
        data.all_scores = _read_scores(scores_file(path))
    for record in queries:
        for key in ("proponents", "opponents"):
            for entry in record.get(key, []):
                if entry.get("text") is not None:
                    data.train_texts[entry["id"]] = entry["text"]
    if data.self_influence is not None:
        data.train_texts.update(_job_texts(path)[0])
    if queries and all(r.get("query_text") is None for r in queries):
        data.notes.append("no texts in influence.jsonl (the directory has no job.yaml with data): ids only.")
    return data


def _id(value: str):
    """CSV ids are strings; integer-looking ones were integers."""
    try:
        return int(value)
    except ValueError:
        return value


def _read_scores(path: Path) -> np.ndarray | None:
    from logix.store.scores import read_score_matrix

    return read_score_matrix(path, max_values=20_000_000)  # a histogram does not need more than a sample


def _job_texts(path: Path, queries: bool = False) -> tuple[dict, dict]:
    """(train texts, query texts) from the job's data (``job.yaml``), or empty dicts."""
    job = job_file(path)
    if not job.exists():
        return {}, {}
    try:
        from logix.config import Config
        from logix.data.build import build_dataset, build_tokenizer, dataset_texts, resolve_path

        config = Config.from_yaml(job)
        dc = config.data
        if not dc.train:
            return {}, {}
        tokenizer = build_tokenizer(config, Path.cwd())
        train = dataset_texts(build_dataset(resolve_path(dc.train, path), dc.limit_train, config, tokenizer))
        query = {}
        if queries and dc.queries:
            query = dataset_texts(build_dataset(resolve_path(dc.queries, path), dc.limit_queries, config, tokenizer))
        return train, query
    except (LogixError, OSError, ValueError) as exc:
        log.warning("logix: texts unavailable for the report (%s)", exc)
        return {}, {}


def _compute_influence(path: Path, top_k: int) -> InfluenceData:
    """Score the logged queries of a run or project that has no influence.jsonl, with the job's
    analysis settings when it has a ``job.yaml`` (else KFAC, ``dot``, relative damping 0.1)."""
    from logix.analysis import influence
    from logix.config import AnalysisConfig, Config
    from logix.config.damping import describe_damping

    ac = Config.from_yaml(job_file(path)).analysis if job_file(path).exists() else AnalysisConfig()
    damping = ac.resolved_damping()
    try:
        result = influence(path, preconditioner=ac.preconditioner, damping=damping,
                           mode=ac.mode, weighting=ac.checkpoints.value, top_k=top_k, per_module=True,
                           memory_budget_mb=ac.memory_budget_mb, progress=False)
    except LogixError as exc:
        raise ReportError(f"{path}: cannot score its logged queries ({' '.join(str(exc).split())}); log queries "
                          "with run.log_queries and finalize the run, or run `logix influence` first.") from exc
    train_texts, query_texts = _job_texts(path, queries=True)
    records = result.to_records()
    for record in records:
        record["query_text"] = query_texts.get(record["query_id"])
        for key in ("proponents", "opponents"):
            for entry in record[key]:
                entry["text"] = train_texts.get(entry["id"])
    data = InfluenceData(records, train_texts=train_texts)
    data.per_module = per_module_records(result)
    if result.self_influence is not None:
        data.self_influence = dict(zip(result.train_ids, result.self_influence.tolist()))
    data.notes.append(f"no influence.jsonl: scored here from the run's stores ({ac.preconditioner}, {ac.mode}, "
                      f"damping {describe_damping(damping)}); "
                      f"`logix influence {path}` writes it.")
    if not train_texts:
        data.notes.append("no job.yaml with data here (a run made with logix.init keeps no texts): examples "
                          "are shown by id.")
    return data


# ---- contribution ------------------------------------------------------------------------------
def _load_contribution(path: Path, job: dict | None) -> ContributionData:
    sel = path / SELECTION_DIR if (path / SELECTION_DIR).is_dir() else path
    notes = []
    scores_path = path / CONTRIBUTION_SCORES_FILE
    if not scores_path.exists():
        scores_path = sel / CONTRIBUTION_SCORES_FILE
    ids, scores = [], {}
    if scores_path.exists():
        from logix.contribution import ScoreTable

        table = ScoreTable.load(scores_path)
        ids, scores = table.ids, dict(table.columns)
    else:
        notes.append("no scores.jsonl: no score distributions.")
    summary = json.loads((sel / SUMMARY_FILE).read_text()) if (sel / SUMMARY_FILE).exists() else None
    if summary is None:
        notes.append("no selection/summary.json: no selection, category or agreement sections "
                     "(`logix select --scores ... --out DIR/selection` writes it).")
    selected = _read_jsonl(sel / SELECTED_FILE) if (sel / SELECTED_FILE).exists() else []
    probes = _read_jsonl(path / PROBES_FILE) if (path / PROBES_FILE).exists() else []
    pool = _pool_records(path, job, summary, notes)
    return ContributionData(scores, ids, summary, selected, probes, pool, notes)


def _pool_records(path: Path, job: dict | None, summary: dict | None, notes: list) -> dict | None:
    candidates = []
    if job:
        contribution, data = job.get("contribution") or {}, job.get("data") or {}
        candidates += [contribution.get("pool"), data.get("train")]
    if summary:
        candidates.append(summary.get("source"))
    for source in candidates:
        if source and Path(source).exists():
            try:
                from logix.contribution import load_pool

                id_field = ((job or {}).get("data") or {}).get("id_field", "id")
                pool = load_pool(source, id_field=id_field)
                return dict(zip(pool.ids, pool.records))
            except LogixError as exc:
                notes.append(f"pool {source} unreadable ({exc}).")
                return None
    notes.append("the pool file is not reachable from here (job.yaml / summary.json name none that exists): "
                 "lengths come from the summary's quantiles, examples are shown by id.")
    return None


# ---- helpers -----------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ReportError(f"{path}, line {n}: not JSON ({exc.msg}); was the file cut short? "
                                      "Re-run the command that wrote it.") from exc
    return out


def _read_yaml(path: Path) -> dict | None:
    if not path.exists():
        return None
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ReportError(f"{path} is not valid YAML ({exc}).") from exc


_INSTRUCTION_FIELDS = ("instruction", "output")  # the fields of an instruction record


def record_text(record: dict | None, fallback: str = "") -> str:
    """A readable one-string form of a pool record (instruction / input / output, or its text)."""
    if not record:
        return fallback
    if any(key in record for key in _INSTRUCTION_FIELDS):
        parts = [str(record.get("instruction") or "")]
        if record.get("input"):
            parts.append(str(record["input"]))
        return " | ".join(p for p in parts if p) + " \u2192 " + str(record.get("output") or "")
    for key in ("text", "prompt", "content"):
        if isinstance(record.get(key), str):
            return record[key]
    return json.dumps(record, ensure_ascii=False)


def response_lengths(records) -> np.ndarray:
    """Characters of each record's response (``output`` field; else its whole text)."""
    out = []
    for r in records:
        value = r.get("output") if isinstance(r, dict) and "output" in r else record_text(r)
        out.append(len(str(value or "")))
    return np.asarray(out, dtype=float)

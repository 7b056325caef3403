"""Choosing a subset by a score and writing it out, with a summary beside the baselines.

    table = ScoreTable.load("scores.jsonl")
    pool = load_pool("pool.jsonl")
    selection = select(table, by="icl", top_p=0.1, pool=pool)
    export_selection(selection, pool, "out/")       # out/selected.jsonl + out/summary.json

Ranking is by descending score; ties break by pool order (stable), and examples a method did
not score (NaN) are never selected. The summary compares the subset with the pool (counts per
category, response length) and with the baselines: for every other score in the table (the
``length`` and ``random`` baselines are added when missing) the overlap of its own top-n with
the selection and its Spearman correlation with the chosen score.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from logix.analysis.evaluate import spearman
from logix.config.choices import ContributionMethod
from logix.contribution.baselines import random_scores, response_length
from logix.contribution.pool import Pool, write_records
from logix.contribution.scores import ScoreTable
from logix.data import PromptTemplate
from logix.errors import DataError
from logix.store.rundir import (
    SELECTED_FILE,
    SUMMARY_FILE,
    contribution_scores_file,
    summary_file,
)

BASELINES = (ContributionMethod.LENGTH, ContributionMethod.RANDOM)


@dataclass
class Selection:
    """The chosen ids (best first) and what they were chosen by (:func:`select`).

    Attributes:
        ids: The chosen ids, best first.
        by: The score column they were chosen by.
        scores: Their scores, descending.
        n_scored: Pool examples with a score under ``by``.
        table: The score table chosen from.
        summary: The selection's summary: size, categories and response lengths of the subset
            against the pool, agreement with the other scores (``summary.json``).
    """

    ids: list
    by: str
    scores: np.ndarray  # the chosen ids' scores, descending
    n_scored: int  # pool examples with a score under ``by``
    table: ScoreTable
    summary: dict[str, Any] = field(default_factory=dict)


def _count(n: int, top_p: float | None, top_k: int | None) -> int:
    if (top_p is None) == (top_k is None):
        raise DataError("give exactly one of top_p (a fraction in (0, 1]) or top_k (a count)")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise DataError(f"top_k must be a positive integer, got {top_k!r}")
        return min(top_k, n)
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:
        raise DataError(f"top_p must be a fraction in (0, 1], got {top_p!r}")
    return max(1, int(math.floor(top_p * n + 1e-9)))


def rank(values: np.ndarray) -> np.ndarray:
    """Positions of scored (non-NaN) entries, best first; ties keep their order."""
    values = np.asarray(values, dtype=np.float64)
    scored = np.flatnonzero(~np.isnan(values))
    order = np.argsort(-values[scored], kind="stable")
    return scored[order]


def select(
    table: ScoreTable,
    by: str,
    *,
    top_p: float | None = None,
    top_k: int | None = None,
    pool: Pool | None = None,
    template: PromptTemplate | None = None,
    category_key: str = "category",
    seed: int = 0,
) -> Selection:
    """The top ``top_p`` fraction (of the scored examples) or ``top_k`` examples by score ``by``.

    Args:
        table: Scores by id (the pool's ids when ``pool`` is given).
        by: The score to rank by (a column of ``table``).
        top_p: Fraction of the scored examples to keep.
        top_k: Number of examples to keep.
        pool: The pool the ids come from: enables the summary and the length / random baselines.
        template: Where a record's response is (for lengths); Alpaca by default.
        category_key: Record field counted per category in the summary (skipped when absent).
        seed: Seed of the random baseline when the table has none.

    Raises:
        DataError: Unknown score, bad ``top_p`` / ``top_k``, no example scored, or ids not in the pool.
    """
    values = table.column(by)
    order = rank(values)
    if order.size == 0:
        raise DataError(f"no example has a {by!r} score (all NaN); nothing to select")
    n = _count(order.size, top_p, top_k)
    chosen = order[:n]
    table = _with_baselines(table, pool, template, seed)
    selection = Selection([table.ids[i] for i in chosen], by, values[chosen], int(order.size), table)
    selection.summary = summarize(selection, pool, template=template, category_key=category_key)
    selection.summary["request"] = {"top_p": top_p, "top_k": top_k}
    return selection


def _with_baselines(table: ScoreTable, pool: Pool | None, template: PromptTemplate | None, seed: int) -> ScoreTable:
    if pool is None:
        return table
    known = set(pool.ids)
    missing = [i for i in table.ids if i not in known]
    if missing:
        raise DataError(f"{len(missing)} scored id(s) are not in the pool {pool.source}, e.g. {missing[0]!r}; "
                        "were the scores computed on another file?")
    out = ScoreTable(list(table.ids), dict(table.columns))
    records = pool.subset(table.ids)
    if ContributionMethod.LENGTH not in out.columns:
        out.add(ContributionMethod.LENGTH.value, response_length(records, template=template))
    if ContributionMethod.RANDOM not in out.columns:
        out.add_by_id(ContributionMethod.RANDOM.value, pool.ids, random_scores(len(pool), seed))
    return out


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    q = np.percentile(values, [10, 50, 90])
    return {"mean": float(values.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def summarize(selection: Selection, pool: Pool | None, *, template: PromptTemplate | None = None,
              category_key: str = "category") -> dict[str, Any]:
    """Counts, length distributions and agreement with the other scores (see the module docstring)."""
    table, n = selection.table, len(selection.ids)
    summary: dict[str, Any] = {"by": selection.by, "selected": n, "scored": selection.n_scored,
                               "pool": len(pool) if pool is not None else len(table)}
    if pool is not None:
        template = template or PromptTemplate()
        records = pool.records
        picked = pool.subset(selection.ids)
        if any(category_key in r for r in records):
            pool_counts = Counter(str(r.get(category_key)) for r in records)
            sel_counts = Counter(str(r.get(category_key)) for r in picked)
            summary["categories"] = {
                c: {"pool": pool_counts[c], "selected": sel_counts.get(c, 0),
                    "share_pool": pool_counts[c] / len(records), "share_selected": sel_counts.get(c, 0) / n}
                for c in sorted(pool_counts)
            }
        summary["response_chars"] = {"pool": _stats(response_length(records, template=template)),
                                     "selected": _stats(response_length(picked, template=template))}
    chosen = table.column(selection.by)
    picked_set = set(selection.ids)
    agreement = {}
    for name in table.names:
        if name == selection.by:
            continue
        other = table.column(name)
        # overlap among the examples both scores rank: the selected ones `other` scored, vs `other`'s
        # own top of that many (a score computed on a sample is compared on that sample only)
        scored_other = {table.ids[i] for i in np.flatnonzero(~np.isnan(other))}
        shared = len(picked_set & scored_other)
        top = {table.ids[i] for i in rank(other)[:shared]}
        both = ~np.isnan(chosen) & ~np.isnan(other)
        rho = float(spearman(chosen[both][:, None], other[both][:, None])[0]) if both.sum() > 2 else math.nan
        agreement[name] = {"overlap": len(picked_set & top) / shared if shared else math.nan,
                           "compared": shared, "spearman": rho, "baseline": name in BASELINES}
    summary["agreement"] = agreement
    return summary


def export_selection(selection: Selection, pool: Pool, out_dir: str | Path, *, name: str = SELECTED_FILE) -> dict[str, Path]:
    """Write the chosen records (the input's own format, best first), the summary and the scores.

    Files (each written atomically: complete or absent): ``<out_dir>/<name>`` (JSON Lines, or a JSON
    list when ``name`` ends in ``.json``), ``summary.json``, and ``scores.jsonl`` (every score column).

    Args:
        selection: What :func:`select` chose.
        pool: The pool the ids come from (the records are taken from it).
        out_dir: The folder to write to.
        name: The subset's file name.

    Returns:
        The written files: ``{"subset": ..., "summary": ..., "scores": ...}``.

    Raises:
        DataError: An id of the selection is not in the pool (checked before anything is written).
    """
    out_dir = Path(out_dir)
    records = pool.subset(selection.ids)  # validates before anything is written
    paths = {"subset": write_records(out_dir / name, records)}
    summary = dict(selection.summary, subset_file=str(paths["subset"]), source=pool.source)
    tmp = out_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(_finite(summary), indent=2) + "\n")
    os.replace(tmp, summary_file(out_dir))
    paths["summary"] = summary_file(out_dir)
    paths["scores"] = selection.table.save(contribution_scores_file(out_dir))
    return paths


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN / inf floats become None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_summary(summary: dict[str, Any]) -> str:
    """A short plain-text report of a selection summary (what ``logix select`` prints).

    Args:
        summary: ``Selection.summary`` (or a ``summary.json`` read back).

    Returns:
        The report: the selected / scored / pool counts, then the agreement with each other
        score, the category shares and the median response lengths (those the summary holds).
    """
    lines = [f"selected {summary['selected']} of {summary['scored']} scored ({summary['pool']} in the pool) by "
             f"{summary['by']!r}"]
    for name, a in summary.get("agreement", {}).items():
        tag = " (baseline)" if a.get("baseline") else ""
        rho = a.get("spearman")
        rho_text = "n/a" if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f"{rho:+.3f}"
        overlap = a.get("overlap")
        overlap_text = "n/a" if overlap is None or (isinstance(overlap, float) and math.isnan(overlap)) else f"{overlap:.3f}"
        lines.append(f"  vs {name:<20}{tag:<11} overlap {overlap_text} (of {a.get('compared', 0)})  spearman {rho_text}")
    if "categories" in summary:
        lines.append("  category              pool   selected")
        for c, v in summary["categories"].items():
            lines.append(f"  {c:<20} {v['share_pool']:6.1%}   {v['share_selected']:6.1%}")
    if "response_chars" in summary:
        p, s = summary["response_chars"]["pool"], summary["response_chars"]["selected"]
        lines.append(f"  response chars (median) pool {p.get('median', 0):.0f}, selected {s.get('median', 0):.0f}")
    return "\n".join(lines)

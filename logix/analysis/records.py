"""An :class:`InfluenceResult` as records and files: per-module breakdowns, the category sanity
figure, and the outputs of an influence project (``influence.jsonl``, ``self_influence.csv``,
``sanity.json``, ``per_module.json``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from logix.analysis.influence import InfluenceResult
from logix.errors import StatisticsError
from logix.store.format import atomic_file, write_json_atomic
from logix.store.rundir import influence_file, per_module_file, sanity_file, scores_file, self_influence_file


def per_module_records(result) -> dict | None:
    """``InfluenceResult.per_module`` as JSON: per query, each module's part of each proponent's score.

    Args:
        result (InfluenceResult): Scores computed with ``per_module=True``.

    Returns:
        ``{"modules": [...], "queries": [{"query_id", "ids", "modules": {module: [part, ...]}}]}``
        (what ``per_module.json`` holds), the parts in the order of the query's top proponents
        ``ids``; None when ``result`` has no per-module breakdown.
    """
    if not result.per_module:
        return None
    modules = list(result.per_module)
    return {"modules": modules, "queries": [
        {"query_id": qid, "ids": list(result.top_ids[q]),
         "modules": {m: [float(v) for v in result.per_module[m][q].tolist()] for m in modules}}
        for q, qid in enumerate(result.query_ids)]}


def category_agreement(result: InfluenceResult, train_cat: dict | None, query_cat: dict | None) -> dict | None:
    """Share of top-k proponents in the query's own category, and what random picks would give.

    Random: for each query, the share of training examples of its category (the expected
    share of a uniformly random top-k), averaged over queries.
    """
    if not train_cat or not query_cat:
        return None
    counts: dict[Any, int] = {}
    for c in train_cat.values():
        counts[c] = counts.get(c, 0) + 1
    hits, total, expected = 0, 0, 0.0
    for qid, top in zip(result.query_ids, result.top_ids):
        category = query_cat.get(qid)
        hits += sum(train_cat.get(t) == category for t in top)
        total += len(top)
        expected += counts.get(category, 0) / len(train_cat)
    same = hits / max(total, 1)
    rand = expected / max(len(result.query_ids), 1)
    return {"same_category": same, "random": rand, "ratio": same / rand if rand else float("inf"),
            "k": float(len(result.top_ids[0]) if result.top_ids else 0)}


def write_outputs(directory: Path, result: InfluenceResult, train_texts: dict, query_texts: dict,
                  sanity: dict | None) -> None:
    """``influence.jsonl`` (per query: proponents and opponents with texts), ``self_influence.csv``,
    ``sanity.json`` and, when the result has per-module scores, ``per_module.json``."""
    # outputs of an earlier result that this one does not replace would be read as its own
    stale = [self_influence_file(directory) if result.self_influence is None else None,
             sanity_file(directory) if sanity is None else None,
             per_module_file(directory) if not result.per_module else None,
             scores_file(directory) if result.scores_path is None else None]
    for path in stale:
        if path is not None:
            path.unlink(missing_ok=True)
    with atomic_file(influence_file(directory)) as fh:
        for record in result.to_records():
            record["query_text"] = query_texts.get(record["query_id"])
            for key in ("proponents", "opponents"):
                for entry in record[key]:
                    entry["text"] = train_texts.get(entry["id"])
            try:
                fh.write(json.dumps(record, allow_nan=False) + "\n")
            except ValueError:
                raise StatisticsError(
                    f"The scores of query {record['query_id']!r} are NaN or Inf: the curvature or the logged rows "
                    "are not finite (run `logix verify` on the run, or raise the damping)."
                ) from None
    if result.self_influence is not None:
        with atomic_file(self_influence_file(directory), newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "self_influence"])
            for tid, value in zip(result.train_ids, result.self_influence.tolist()):
                writer.writerow([tid, f"{value:.6e}"])
    if sanity is not None:
        write_json_atomic(sanity_file(directory), sanity)
    if result.per_module:  # compute_influence(per_module=True) / `logix influence --per-module`
        write_json_atomic(per_module_file(directory), per_module_records(result))

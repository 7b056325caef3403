"""``logix inspect``: a readable summary of a run directory, a job / callback project, or a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from logix.contribution.scores import ScoreTable
from logix.contribution.selection import format_summary
from logix.core.statistics import Statistics
from logix.errors import LogixError
from logix.store import Store
from logix.store.format import read_manifest
from logix.store.rundir import (
    checkpoints_file,
    contribution_scores_file,
    job_file,
    model_run_dir,
    run_file,
    selection_dir,
    statistics_file,
    stores_dir,
    summary_file,
)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def inspect_run(run_dir: Path) -> str:
    """A readable summary of a run directory, a job / callback project, or a single store."""
    return format_description(describe(run_dir))


def describe(run_dir: Path) -> dict[str, Any]:
    """What ``run_dir`` holds, as JSON-ready data (``logix inspect --json``): a dict whose ``kind``
    is ``store``, ``run``, ``project`` or ``contribution``, and ``path``. A project interrupted
    before its checkpoint index has ``status`` ``interrupted`` (or ``empty``) and its model run."""
    run_dir = Path(run_dir)
    if read_manifest(run_dir) is not None:
        return _store(run_dir.name, Store(run_dir), run_dir)
    index = checkpoints_file(run_dir)
    if index.exists():
        return _project(run_dir, json.loads(index.read_text())["checkpoints"])
    if contribution_scores_file(run_dir).exists():  # a `logix contribute` project
        return _contribution(run_dir)
    if not run_file(run_dir).exists() and job_file(run_dir).exists():  # a job interrupted before its index
        model = model_run_dir(run_dir)
        logged = run_file(model).exists()
        return {"kind": "project", "path": str(run_dir), "status": "interrupted" if logged else "empty",
                "checkpoints": [], "outputs": [], "last_checkpoint": _run(model) if logged else None}
    if not run_file(run_dir).exists():
        raise LogixError(f"{run_dir} is not a logix run, project or store directory (no run.json, job.yaml, "
                         "checkpoints.json or manifest.json).")
    return _run(run_dir)


def _run(run_dir: Path) -> dict[str, Any]:
    info = json.loads(run_file(run_dir).read_text())
    stores = sorted(p for p in stores_dir(run_dir).glob("*") if read_manifest(p) is not None)
    stats_path = statistics_file(run_dir)
    statistics = None
    if stats_path.exists():
        stats = Statistics.load(stats_path)
        statistics = {"file": stats_path.name, "keys": sorted({k.split("::")[1] for k in stats.flat()}),
                      "modules": len(stats.modules)}
    return {"kind": "run", "path": str(run_dir), "passes": info["passes"], "done": info["done"],
            "finalized": info["finalized"], "projection": info["identity"]["projection"]["type"],
            "versions": info.get("environment", {}), "row_stores": [_store(p.name, Store(p), p) for p in stores],
            "statistics": statistics}


def _project(project: Path, entries: list[dict]) -> dict[str, Any]:
    last = project / entries[-1]["dir"] if entries else None
    return {"kind": "project", "path": str(project), "status": "logged",
            "checkpoints": [{k: e.get(k) for k in ("name", "step", "epoch", "learning_rate", "dir")} for e in entries],
            "outputs": [p.name for p in sorted(project.glob("*")) if p.suffix in (".jsonl", ".csv", ".h5", ".json")],
            "last_checkpoint": _run(last) if last is not None and run_file(last).exists() else None}


def _store(name: str, store: Store, path: Path) -> dict[str, Any]:
    return {"kind": "store", "name": name, "path": str(path), "rows": store.n_rows, "shards": store.n_shards,
            "dtype": store.dtype_name, "dim": store.dim, "bytes": store.nbytes(), "per_token": store.per_token,
            "first_ids": list(store.ids[:3]),
            "modules": [{"name": b.name, "kind": b.kind, "shape": list(b.shape)} for b in store.layout.blocks]}


def _contribution(project: Path) -> dict[str, Any]:
    """Scores per method of a contribution project, and its selection when one was exported."""
    table = ScoreTable.load(contribution_scores_file(project))
    scores = {}
    for name, values in table.columns.items():
        scored = int((~np.isnan(values)).sum())
        scores[name] = {"scored": scored, **({"mean": float(np.nanmean(values)), "min": float(np.nanmin(values)),
                                               "max": float(np.nanmax(values))} if scored else {})}
    summary = summary_file(selection_dir(project))
    return {"kind": "contribution", "path": str(project), "examples": len(table), "scores": scores,
            "selection": json.loads(summary.read_text()) if summary.exists() else None}


# ---- the text of `logix inspect` ------------------------------------------------------------------
def format_description(d: dict[str, Any]) -> str:
    """The text ``logix inspect`` prints for a :func:`describe` result."""
    return {"store": _format_store, "run": _format_run, "project": _format_project,
            "contribution": _format_contribution}[d["kind"]](d)


def _format_store(d: dict[str, Any]) -> str:
    ids = d["first_ids"]
    head = ", ".join(map(str, ids)) + (", ..." if d["rows"] > len(ids) else "")
    lines = [
        f"store {d['name']!r}: {d['rows']} rows in {d['shards']} shards, dtype {d['dtype']}, "
        f"{d['dim']} values per row, {human_bytes(d['bytes'])}" + (" (per token)" if d["per_token"] else ""),
        f"  ids: {head}",
        f"  {'module':<40}{'kind':<11}{'block':>12}",
    ]
    lines += [f"  {m['name']:<40}{m['kind']:<11}{str(tuple(m['shape'])):>12}" for m in d["modules"]]
    return "\n".join(lines)


def _format_run(d: dict[str, Any]) -> str:
    lines = [
        f"run        {d['path']}",
        f"passes     {d['passes']} (done: {d['done']}; finalized: {d['finalized']})",
        f"projection {d['projection']}",
        "versions   " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()
                                   if k in ("logix", "torch", "transformers", "python")),
    ]
    for store in d["row_stores"]:
        lines += ["", _format_store(store)]
    if d["statistics"]:
        st = d["statistics"]
        lines += ["", f"statistics {st['keys']} for {st['modules']} modules ({st['file']})"]
    return "\n".join(lines)


def _format_project(d: dict[str, Any]) -> str:
    last = d["last_checkpoint"]
    if d["status"] == "empty":
        return f"project    {d['path']} (a job that has logged nothing yet)"
    if d["status"] == "interrupted":
        return "\n".join([f"project    {d['path']} (interrupted: no checkpoints.json yet; resume with the same "
                          "command)", "", _format_run(last)])
    lines = [f"project    {d['path']} ({len(d['checkpoints'])} logged checkpoint(s))"]
    for e in d["checkpoints"]:
        lr = e["learning_rate"]
        lines.append(f"  {e['name']:<12} step {e['step']}, epoch {e['epoch']}, lr {'-' if lr is None else f'{lr:.3g}'}")
    lines.append(f"outputs    {', '.join(d['outputs']) or '-'}")
    if last is not None:
        lines += ["", f"last checkpoint ({d['checkpoints'][-1]['name']}):", _format_run(last)]
    return "\n".join(lines)


def _format_contribution(d: dict[str, Any]) -> str:
    lines = [f"contribution project {d['path']}: {d['examples']} examples scored"]
    for name, s in d["scores"].items():
        lines.append(f"  {name:<22} {s['scored']:>7} scored" + (
            f", mean {s['mean']:+.4g}, range [{s['min']:+.4g}, {s['max']:+.4g}]" if s["scored"] else ""))
    if d["selection"]:
        lines += ["", format_summary(d["selection"])]
    return "\n".join(lines)

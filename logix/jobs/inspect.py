"""``logix inspect``: a readable summary of a run directory, a job / callback project, or a store."""

from __future__ import annotations

import json
from pathlib import Path

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
    if read_manifest(run_dir) is not None:
        return _describe_store(run_dir.name, Store(run_dir))
    index = checkpoints_file(run_dir)
    if index.exists():
        return _describe_project(run_dir, json.loads(index.read_text())["checkpoints"])
    if contribution_scores_file(run_dir).exists():  # a `logix contribute` project
        return _describe_contribution(run_dir)
    if not run_file(run_dir).exists() and job_file(run_dir).exists():  # a job interrupted before its index
        model = model_run_dir(run_dir)
        if not run_file(model).exists():
            return f"project    {run_dir} (a job that has logged nothing yet)"
        return "\n".join([f"project    {run_dir} (interrupted: no checkpoints.json yet; resume with the same "
                          "command)", "", inspect_run(model)])
    info_path = run_file(run_dir)
    if not info_path.exists():
        raise LogixError(f"{run_dir} is not a logix run, project or store directory (no run.json, job.yaml, "
                         "checkpoints.json or manifest.json).")
    info = json.loads(info_path.read_text())
    lines = [
        f"run        {run_dir}",
        f"passes     {info['passes']} (done: {info['done']}; finalized: {info['finalized']})",
        f"projection {info['identity']['projection']['type']}",
        "versions   " + ", ".join(f"{k} {v}" for k, v in info.get("environment", {}).items()
                                   if k in ("logix", "torch", "transformers", "python")),
    ]
    stores = sorted(p for p in stores_dir(run_dir).glob("*") if read_manifest(p) is not None)
    for path in stores:
        lines += ["", _describe_store(path.name, Store(path))]
    stats_path = statistics_file(run_dir)
    if stats_path.exists():
        stats = Statistics.load(stats_path)
        keys = sorted({k.split("::")[1] for k in stats.flat()})
        lines += ["", f"statistics {keys} for {len(stats.modules)} modules ({stats_path.name})"]
    return "\n".join(lines)


def _describe_project(project: Path, entries: list[dict]) -> str:
    lines = [f"project    {project} ({len(entries)} logged checkpoint(s))"]
    for e in entries:
        lr = e.get("learning_rate")
        lines.append(f"  {e['name']:<12} step {e.get('step')}, epoch {e.get('epoch')}, "
                     f"lr {'-' if lr is None else f'{lr:.3g}'}")
    outputs = [p.name for p in sorted(project.glob("*")) if p.suffix in (".jsonl", ".csv", ".h5", ".json")]
    lines.append(f"outputs    {', '.join(outputs) or '-'}")
    last = project / entries[-1]["dir"] if entries else None
    if last is not None and run_file(last).exists():
        lines += ["", f"last checkpoint ({entries[-1]['name']}):", inspect_run(last)]
    return "\n".join(lines)


def _describe_store(name: str, store: Store) -> str:
    ids = store.ids
    head = ", ".join(map(str, ids[:3])) + (", ..." if len(ids) > 3 else "")
    lines = [
        f"store {name!r}: {store.n_rows} rows in {store.n_shards} shards, dtype {store.dtype_name}, "
        f"{store.dim} values per row, {human_bytes(store.nbytes())}" + (" (per token)" if store.per_token else ""),
        f"  ids: {head}",
        f"  {'module':<40}{'kind':<11}{'block':>12}",
    ]
    for block in store.layout.blocks:
        lines.append(f"  {block.name:<40}{block.kind:<11}{str(block.shape):>12}")
    return "\n".join(lines)


def _describe_contribution(project: Path) -> str:
    """Scores per method of a contribution project, and its selection when one was exported."""
    table = ScoreTable.load(contribution_scores_file(project))
    lines = [f"contribution project {project}: {len(table)} examples scored"]
    for name, values in table.columns.items():
        scored = int((~np.isnan(values)).sum())
        lines.append(f"  {name:<22} {scored:>7} scored" + (
            f", mean {np.nanmean(values):+.4g}, range [{np.nanmin(values):+.4g}, {np.nanmax(values):+.4g}]"
            if scored else ""))
    summary = summary_file(selection_dir(project))
    if summary.exists():
        lines += ["", format_summary(json.loads(summary.read_text()))]
    return "\n".join(lines)

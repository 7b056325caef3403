"""The crash-safe logs of an in-context pass, and the scores recomputed from them alone.

Under ``<run_dir>/icl/``: ``meta.json`` (settings and the ordered ids), the store ``probes/`` (one
row per probe id: summed NLL and token count of ``y_i | x_i``) and the store ``pairs/`` (one row
per ``"{candidate_id}\\x1f{probe_id}"``: summed NLL and count with the demonstration, then with
the control), in float64.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logix.contribution.icl_plan import ID_SEP, Plan
from logix.contribution.icl_result import IclResult
from logix.data.template import PromptTemplate
from logix.errors import RunDirectoryError, StoreError
from logix.store import Layout, ShardWriter
from logix.store.format import write_json_atomic
from logix.store.records import committed_rows
from logix.store.rundir import ICL_META_FILE, ICL_PAIRS_STORE, ICL_PROBES_STORE, icl_dir, icl_meta_file

META_VERSION = 1


def pass_meta(plan: Plan, model: torch.nn.Module, tokenizer: Any, template: PromptTemplate, control: str,
              seed: int, separator: str) -> dict[str, Any]:
    return {
        "version": META_VERSION,
        "control": control,
        "seed": int(seed),
        "separator": separator,
        "template": dataclasses.asdict(template),
        "bos": plan.bos,
        "max_length": plan.max_length,
        "demonstration_budget": plan.budget,
        "model": {
            "class": type(model).__name__,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "name_or_path": str(getattr(getattr(model, "config", None), "name_or_path", "")),
        },
        "tokenizer": {"class": type(tokenizer).__name__, "size": len(tokenizer)},
        "candidate_ids": plan.cand_ids,
        "probe_ids": plan.probe_ids,
    }


def open_writer(directory: Path, width: int):
    layout = Layout.build([("icl", "icl", (1, width))])
    writer = ShardWriter(directory, layout, "float64", per_token=False)
    writer.set_id_type("str")
    return writer


def check_meta(path: Path, meta: dict[str, Any], overwrite: bool) -> None:
    logs = path.parent
    if path.exists():
        if overwrite:
            shutil.rmtree(logs)
        else:
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise RunDirectoryError(
                    f"{logs} holds an in-context pass with different {', '.join(diff)}; "
                    "use a new run_dir or pass overwrite=True")
            return
    elif logs.exists() and overwrite:
        shutil.rmtree(logs)
    logs.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, meta)


def load_icl_scores(run_dir: str | Path, partial: bool = False) -> IclResult:
    """Recompute the in-context scores from the logs of a pass, without the model.

    Args:
        run_dir: The ``run_dir`` given to :func:`icl_contribution`.
        partial: Return only the candidates whose every pair is committed, instead of failing when
            the pass was interrupted.

    Raises:
        StoreError: There are no logs, or (without ``partial``) the pass is incomplete.
    """
    logs = icl_dir(run_dir)
    path = icl_meta_file(run_dir)
    if not path.exists():
        raise StoreError(f"no in-context contribution logs at {logs} (no {ICL_META_FILE}); run icl_contribution "
                         "with run_dir first")
    meta = json.loads(path.read_text())
    probes = committed_rows(logs / ICL_PROBES_STORE)
    pairs = committed_rows(logs / ICL_PAIRS_STORE)
    probe_ids = meta["probe_ids"]
    missing_p = [p for p in probe_ids if p not in probes]
    if missing_p:
        raise StoreError(f"{logs}: {len(missing_p)} probe(s) have no logged P0 (e.g. {missing_p[0]!r}); the pass "
                         "was interrupted: rerun icl_contribution with the same run_dir to resume")
    done = [c for c in meta["candidate_ids"] if all(f"{c}{ID_SEP}{p}" in pairs for p in probe_ids)]
    if len(done) < len(meta["candidate_ids"]) and not partial:
        raise StoreError(f"{logs}: {len(meta['candidate_ids']) - len(done)} of {len(meta['candidate_ids'])} "
                         "candidates are not fully scored; rerun icl_contribution with the same run_dir to resume, "
                         "or pass partial=True")
    p0 = np.array([probes[p] for p in probe_ids]).reshape(len(probe_ids), 2)
    rows = np.array([[pairs[f"{c}{ID_SEP}{p}"] for p in probe_ids] for c in done]).reshape(len(done), len(probe_ids), 4)
    return IclResult(
        ids=done, probe_ids=list(probe_ids), nll0=p0[:, 0], n0=p0[:, 1].astype(np.int64),
        nll_t=rows[..., 0], n_t=rows[..., 1].astype(np.int64), nll_r=rows[..., 2], n_r=rows[..., 3].astype(np.int64),
        control=meta["control"],
    )


def submit_rows(writer: Any, rows: dict[str, np.ndarray]) -> None:
    writer.submit(torch.from_numpy(np.stack(list(rows.values()))), list(rows))


def write_rows(directory: Path, width: int, rows: dict[str, np.ndarray]) -> None:
    writer = open_writer(directory, width)
    try:
        submit_rows(writer, rows)
        writer.close()
    except BaseException:
        writer.abort()
        raise

"""What each ``logix`` command does (imports of the library, and so of torch, stay inside the
commands, so that ``--help`` is fast)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from logix.errors import LogixError

if TYPE_CHECKING:
    from logix.config import AnalysisConfig


def json_ready(value: Any) -> Any:
    """``value`` with NaN / Inf floats as null, so that ``json.dumps`` writes strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def cmd_inspect(args: argparse.Namespace) -> None:
    from logix.jobs.inspect import describe, format_description

    description = describe(args.run_dir)
    print(json.dumps(json_ready(description), allow_nan=False) if args.json else format_description(description))


# ---- verify ------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    from logix.store.verify import verify_path

    result = verify_path(args.run_dir)
    print(result.summary())
    return 0 if result.ok else 1


# ---- run / extract -----------------------------------------------------------------------------
def _job(args: argparse.Namespace):
    from logix.jobs.attribution import AttributionJob

    return AttributionJob.from_yaml(args.config, args.overrides, project=args.project, overwrite=args.overwrite,
                                    progress=not args.quiet)


def cmd_run(args: argparse.Namespace) -> None:
    from logix.core.distributed import Dist

    result = _job(args).run()
    if Dist.current().is_main:
        print(result.summary(max_queries=args.show))
        print(f"\noutputs in {result.dir}")


def cmd_extract(args: argparse.Namespace) -> None:
    from logix.core.distributed import Dist

    result = _job(args).run(extract_only=True)
    if Dist.current().is_main:
        from logix.jobs.inspect import inspect_run

        print(inspect_run(result.dir))


# ---- influence ---------------------------------------------------------------------------------
def _analysis_defaults(directory: Path) -> AnalysisConfig:
    from logix.config import AnalysisConfig, Config
    from logix.store.rundir import job_file

    job = job_file(directory)
    return Config.from_yaml(job).analysis if job.exists() else AnalysisConfig()


def cmd_influence(args: argparse.Namespace) -> None:
    from logix.analysis import Damping, influence
    from logix.analysis.records import category_agreement, write_outputs
    from logix.config.damping import describe_damping
    from logix.core.distributed import Dist
    from logix.store.rundir import influence_file, scores_file, scoring_dir

    directory = args.run_dir
    if not directory.is_dir():
        raise LogixError(f"{directory} is not a directory.")
    ac = _analysis_defaults(directory)
    pre = args.preconditioner or ac.preconditioner
    if args.preconditioner and args.preconditioner != ac.preconditioner and ac.damping is None:
        ac = dataclasses.replace(ac, preconditioner=args.preconditioner)  # its own default damping
    damping = ac.resolved_damping()
    if args.damping is not None or args.absolute_damping is not None:
        if damping is None and args.damping is None:
            raise LogixError("--absolute-damping needs a value: add --damping VALUE (the job's analysis.damping is null).")
        base = damping or Damping(args.damping)
        damping = Damping(base.value if args.damping is None else args.damping,
                          base.relative if args.absolute_damping is None else not args.absolute_damping)
    out = args.out or directory
    dist = Dist.current()
    dist.on_main(lambda: out.mkdir(parents=True, exist_ok=True))
    parts = (args.work_dir is not None or dist.active) and not args.use_index
    result = influence(
        directory, preconditioner=pre, damping=damping, mode=args.mode or ac.mode,
        weighting=args.weighting or ac.checkpoints.value, top_k=args.top_k or ac.top_k,
        memory_budget_mb=ac.memory_budget_mb, scores_path=scores_file(out) if args.save_scores else None,
        per_module=args.per_module, progress=not args.quiet,
        full_space_run=args.full_space_run or ac.full_space_run,
        work_dir=(args.work_dir or scoring_dir(out)) if parts else None, part_rows=args.part_rows,
        overwrite_parts=args.overwrite, **({"use_index": True} if args.use_index else {}),
    )
    if not dist.is_main:
        return
    texts = _job_texts(directory)
    sanity = category_agreement(result, *texts[2:]) if texts else None
    write_outputs(out, result, texts[0] if texts else {}, texts[1] if texts else {}, sanity)
    messages = sys.stderr if args.json else sys.stdout  # --json: stdout holds the records only
    if args.json:
        with influence_file(out).open() as fh:  # the records just written, one JSON object per line
            sys.stdout.writelines(fh)
        sys.stdout.flush()
    print(f"scored {len(result.query_ids)} queries x {len(result.train_ids)} train rows "
          f"({pre}, damping {describe_damping(damping)}"
          f"{f', {dist.world_size} processes' if dist.active else ''}); wrote {influence_file(out)}", file=messages)
    if parts and result.scores_path is not None:
        print(f"score matrix: {result.scores_path} (a virtual dataset over the parts beside it)", file=messages)
    if sanity:
        print(f"sanity: {sanity['same_category']:.1%} of top-{int(sanity['k'])} proponents share the "
              f"query's category (random: {sanity['random']:.1%})", file=messages)


def _query_texts(args: argparse.Namespace) -> None:
    """``logix query DIR --text ...``: new texts scored against DIR's train rows (logix.score)."""
    from logix.analysis import index_run_dir
    from logix.config import Damping
    from logix.data import PadCollator, TextDataset
    from logix.integrations.score import score
    from logix.jobs.attribution import load_job_model
    from logix.store.rundir import job_file

    run_dir = index_run_dir(args.run_dir)
    project = next((d for d in (args.run_dir, run_dir, run_dir.parent) if job_file(d).exists()), None)
    if project is None:
        raise LogixError(f"--text: no job.yaml in {args.run_dir} or above it, so its model is unknown; "
                         "score new examples from Python with logix.score(run_dir, examples, model=...).")
    model, tokenizer, config = load_job_model(project, args.model)
    items = TextDataset([{"id": f"text-{i}", "text": t} for i, t in enumerate(args.text)], tokenizer,
                        config.data.max_length)
    damping = None if args.damping is None else Damping(args.damping)
    result = score(run_dir, [items[i] for i in range(len(items))], model=model,
                   collator=PadCollator(tokenizer.pad_token_id), preconditioner=args.preconditioner or "auto",
                   damping=damping, mode=args.mode, top_k=args.top_k, nprobe=args.nprobe, rerank=args.rerank)
    texts = _job_texts(project) if args.texts else None
    for q, (qid, text) in enumerate(zip(result.query_ids, args.text)):
        record = {"query_id": qid, "query_text": text, "proponents": _hits(result.top_ids[q], result.top_scores[q], texts)}
        if args.opponents:
            record["opponents"] = _hits(result.bottom_ids[q], result.bottom_scores[q], texts)
        print(json.dumps(record))


def _hits(ids: list, scores, texts) -> list[dict]:
    return [{"id": i, "score": float(s), **({"text": texts[0].get(i)} if texts else {})}
            for i, s in zip(ids, scores.tolist()) if i is not None]


def _job_texts(directory: Path):
    """(train texts, query texts, train categories, query categories) from the job's data, if any."""
    from logix.store.rundir import job_file

    job = job_file(directory)
    if not job.exists():
        return None
    from logix.config import Config
    from logix.data import build_datasets, build_tokenizer, dataset_categories, dataset_texts

    config = Config.from_yaml(job)
    try:
        tokenizer = build_tokenizer(config, Path.cwd())
        train, queries = build_datasets(config, tokenizer, Path.cwd())
    except (LogixError, OSError) as exc:
        logging.getLogger("logix").warning("logix: texts unavailable (%s)", exc)
        return None
    if queries is None:
        return None
    return (dataset_texts(train), dataset_texts(queries), dataset_categories(train, config),
            dataset_categories(queries, config))


# ---- contribution ------------------------------------------------------------------------------
def cmd_contribute(args: argparse.Namespace) -> None:
    from logix.config import Config
    from logix.jobs.contribution import ContributionJob

    config = Config.from_yaml(args.config, args.overrides)
    job = ContributionJob(config, project=args.project, config_dir=args.config.resolve().parent,
                          overwrite=args.overwrite, progress=not args.quiet)
    print(job.run().summary())


# ---- report ------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> None:
    from logix.report import write_report

    path = write_report(args.run_dir, args.out, title=args.title, top_k=args.top_k, max_queries=args.max_queries,
                        max_rows=args.max_rows)
    print(f"wrote {path} (open it in a browser; it needs no network)")


def cmd_select(args: argparse.Namespace) -> None:
    from logix.contribution import ScoreTable, export_selection, format_summary, load_pool, select
    from logix.data import PromptTemplate
    from logix.store.rundir import SELECTED_FILE

    if (args.top_p is None) == (args.top_k is None):
        raise LogixError("give exactly one of --top-p or --top-k")
    table = ScoreTable.load(args.scores)
    pool = load_pool(args.pool, id_field=args.id_field)
    template = PromptTemplate(output_field=args.output_field)
    selection = select(table, args.by, top_p=args.top_p, top_k=args.top_k, pool=pool, template=template,
                       category_key=args.category_field, seed=args.seed)
    paths = export_selection(selection, pool, args.out, name=args.name or SELECTED_FILE)
    print(format_summary(selection.summary))
    print(f"wrote {paths['subset']} and {paths['summary']}")


# ---- index / query -----------------------------------------------------------------------------
def cmd_index(args: argparse.Namespace) -> None:
    from logix.analysis import Index, index_run_dir
    from logix.config import Damping
    from logix.config.choices import IndexKind

    run_dir = index_run_dir(args.run_dir)
    index = Index.build(run_dir, kind=args.kind, mode=args.mode, preconditioner=args.preconditioner,
                        damping=None if args.damping is None else Damping(args.damping), nlist=args.nlist, m=args.m,
                        nbits=args.nbits, hnsw_m=args.hnsw_m, train_rows=args.train_rows, reduce=args.reduce,
                        gpu=True if args.gpu else None,
                        progress=not args.quiet)
    rows_bytes = index.store.nbytes()
    reduced = f", reduced to {index.meta['reduce']} coordinates" if index.meta.get("reduce") else ""
    print(f"indexed {len(index)} rows of {run_dir} ({index.kind.value}{reduced}, mode {args.mode}, "
          f"{index.meta['params']}) in {index.meta['build_s']:.1f} s: {index.nbytes / max(len(index), 1):.1f} bytes "
          f"per row ({index.nbytes / max(rows_bytes, 1):.3f} of the stored rows)")
    if "choice" in index.meta:
        tried = ", ".join(f"{k} {v:.3f}" for k, v in index.meta["choice"]["recall@10"].items())
        print(f"auto: recall@10 on {index.meta['choice']['sample']} sampled query rows: {tried}; kept {index.kind.value}")
    if args.check and index.kind is not IndexKind.FLAT:
        measured = index.meta.get("choice", {})  # auto measured the kept kind on this very sample already
        got = (measured["recall@10"][index.kind.value] if measured.get("sample") == args.check
               else index.recall(sample=args.check))
        print(f"recall@10 against the exact scan on {min(args.check, len(index))} sampled query rows "
              f"(default nprobe, rerank 10): {got:.3f}")
        tried = index.meta.get("choice", {}).get("recall@10", {})
        if got < 0.9 and len(tried) > 1:
            print(f"warning: neither inverted lists nor a graph reach recall 0.9 on these rows ({tried}); "
                  "query with a larger --rerank, or build --kind flat (exact)", file=sys.stderr)
        elif got < 0.9:
            other = "hnswsq4" if index.kind.value.startswith("ivf") else "ivfpq"
            print(f"warning: recall {got:.3f} is low for these rows: try --kind {other} (inverted files suit rows "
                  "that cluster, graphs rows that do not), or search with a larger --nprobe / --rerank",
                  file=sys.stderr)


def cmd_query(args: argparse.Namespace) -> None:
    from logix.analysis import Index, index_run_dir
    from logix.config import Damping
    from logix.store import Store
    from logix.store.format import read_manifest
    from logix.store.rundir import QUERY_STORE, store_dir

    if args.text:
        return _query_texts(args)
    run_dir = index_run_dir(args.run_dir)
    index = Index.load(run_dir)
    source = args.queries or run_dir
    if read_manifest(source) is None:
        source = store_dir(index_run_dir(source), QUERY_STORE)
    if read_manifest(source) is None:
        raise LogixError(f"{args.queries or run_dir} holds no logged queries (no queries store).")
    queries = Store(source)
    rows = queries.read_all()
    damping = None if args.damping is None else Damping(args.damping)
    found = {"proponents": index.search(rows, args.top_k, args.preconditioner, damping, nprobe=args.nprobe,
                                        rerank=args.rerank)}
    if args.opponents:
        found["opponents"] = index.search(rows, args.top_k, args.preconditioner, damping, largest=False,
                                          nprobe=args.nprobe, rerank=args.rerank)
    texts = _job_texts(args.run_dir) if args.texts else None
    if args.texts and texts is None:
        raise LogixError(f"--texts: {args.run_dir} has no job data to read texts from (a logix run / extract project).")
    for q, qid in enumerate(queries.ids):
        record = {"query_id": qid}
        if texts:
            record["query_text"] = texts[1].get(qid)
        for key, hits in found.items():
            record[key] = [{"id": i, "score": float(s), **({"text": texts[0].get(i)} if texts else {})}
                           for i, s in zip(hits.ids[q], hits.scores[q].tolist()) if i is not None]
        print(json.dumps(record))


# ---- damping -------------------------------------------------------------------------------------
def cmd_damping(args: argparse.Namespace) -> None:
    import numpy as np

    from logix.analysis import SWEEP_DAMPINGS, Damping, damping_sweep

    if not args.ground_truth.is_file():
        raise LogixError(f"{args.ground_truth} does not exist: write it with "
                         "logix.analysis.retrain_on_subsets(train_fn, n_train, cache=FILE).")
    with np.load(args.ground_truth, allow_pickle=False) as data:
        missing = {"masks", "outputs"} - set(data.files)
        if missing:
            raise LogixError(f"{args.ground_truth} has no {sorted(missing)}: it needs masks (n_subsets x n_train) and "
                             f"outputs (n_subsets x n_query); it holds {sorted(data.files)}.")
        masks, outputs = data["masks"], data["outputs"]
        ids = data["train_ids"].tolist() if "train_ids" in data.files else None
    dampings = [Damping(d, not args.absolute_damping) for d in (args.dampings or SWEEP_DAMPINGS)]
    sweep = damping_sweep(args.run_dir, masks, outputs, dampings, args.preconditioner or ["auto"], ids, args.mode,
                          progress=not args.quiet)
    print(f"{args.run_dir}: LDS against {masks.shape[0]} retrained models, {outputs.shape[1]} queries")
    print(sweep)
    best, kind = sweep.best, sweep.best_preconditioner
    flag = f"--preconditioner {kind} --damping {best.value:g}" + ("" if best.relative else " --absolute-damping")
    print(f"best: {kind} at {best.value:g} {'relative' if best.relative else 'absolute'} (logix influence {flag})")
    if args.json:
        args.json.write_text(json.dumps(json_ready(sweep.to_records()), indent=1) + "\n")

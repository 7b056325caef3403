"""The ``logix`` command line.

    logix run CONFIG [key.sub=value ...]        fine-tune (or load) a model, log, score influence
    logix extract CONFIG [key.sub=value ...]    log a dataset with the model held fixed (no training)
    logix influence DIR [options]               score the queries logged in DIR against its train rows
    logix inspect DIR                           what a run, project or store directory holds
    logix verify DIR                            check every stored byte; name each damaged file
    logix contribute CONFIG [key.sub=value ...] score instruction data, fit a selector, select a subset
    logix select --scores F --pool F --by NAME  select the top of a score table and export the subset
    logix report DIR                            a self-contained HTML report of a project or run

Every command exits 0 on success, and on a user error prints one line ``logix: error: ...``
to stderr and exits 1 (2 for a malformed command line, a bad option value included;
``logix verify`` exits 1 when it finds a damaged file).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from logix.errors import LogixError

if TYPE_CHECKING:  # the library (and torch) is imported by the commands, so that --help stays fast
    from logix.config import AnalysisConfig


class Command(str, enum.Enum):
    """The subcommands of ``logix``."""

    RUN = "run"
    EXTRACT = "extract"
    INFLUENCE = "influence"
    CONTRIBUTE = "contribute"
    SELECT = "select"
    REPORT = "report"
    INSPECT = "inspect"
    VERIFY = "verify"

    @property
    def distributed(self) -> bool:
        """Whether the command joins a ``torchrun`` launcher's process group."""
        return self in (Command.RUN, Command.EXTRACT, Command.INFLUENCE)


# ---- option values: checked by argparse, so a bad one is one line and exit code 2 ---------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = nonnegative_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """A malformed command line is one line on stderr (``logix COMMAND: error: ...``), exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_inspect(args: argparse.Namespace) -> None:
    from logix.jobs.inspect import inspect_run

    print(inspect_run(args.run_dir))


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
        damping = Damping(damping.value if args.damping is None else args.damping,
                          damping.relative if args.absolute_damping is None else not args.absolute_damping)
    out = args.out or directory
    dist = Dist.current()
    dist.on_main(lambda: out.mkdir(parents=True, exist_ok=True))
    parts = args.work_dir is not None or dist.active
    result = influence(
        directory, preconditioner=pre, damping=damping, mode=args.mode or ac.mode,
        weighting=args.weighting or ac.checkpoints.value, top_k=args.top_k or ac.top_k,
        memory_budget_mb=ac.memory_budget_mb, scores_path=scores_file(out) if args.save_scores else None,
        per_module=args.per_module, progress=not args.quiet,
        full_space_run=args.full_space_run or ac.full_space_run,
        work_dir=(args.work_dir or scoring_dir(out)) if parts else None, part_rows=args.part_rows,
        overwrite_parts=args.overwrite,
    )
    if not dist.is_main:
        return
    texts = _job_texts(directory)
    sanity = category_agreement(result, *texts[2:]) if texts else None
    write_outputs(out, result, texts[0] if texts else {}, texts[1] if texts else {}, sanity)
    print(f"scored {len(result.query_ids)} queries x {len(result.train_ids)} train rows "
          f"({pre}, damping {damping.value:g}{' relative' if damping.relative else ''}"
          f"{f', {dist.world_size} processes' if dist.active else ''}); wrote {influence_file(out)}")
    if parts and result.scores_path is not None:
        print(f"score matrix: {result.scores_path} (a virtual dataset over the parts beside it)")
    if sanity:
        print(f"sanity: {sanity['same_category']:.1%} of top-{int(sanity['k'])} proponents share the "
              f"query's category (random: {sanity['random']:.1%})")


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


# ---- entry point -------------------------------------------------------------------------------
class _Formatter(argparse.HelpFormatter):
    """Fixed width, so that ``--help`` (and docs/cli.md) reads the same on every terminal."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=32)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="logix", description="logix: which training data made your "
                                     "model do what it does.", formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in ((Command.RUN, "fine-tune (or load) a model, log it, score influence"),
                               (Command.EXTRACT, "log a dataset with the model held fixed (no training)")):
        p = sub.add_parser(command.value, help=help_text, description=help_text, formatter_class=_Formatter)
        p.add_argument("config", type=Path, help="YAML config (see docs/configuration.md)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.add_argument("--project", default="job", help="directory under the config's root (default: job)")
        p.add_argument("--overwrite", action="store_true", help="delete the project directory first")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if command is Command.RUN:
            p.add_argument("--show", type=positive_int, default=5, help="queries printed (all are written)")
    p = sub.add_parser(Command.INFLUENCE.value, help="score logged queries against the train rows", formatter_class=_Formatter,
                       description="Score the queries logged in DIR (a run, or a job / Trainer project "
                       "whose checkpoints combine TracIn-style). Defaults come from DIR/job.yaml.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--preconditioner", choices=["identity", "raw", "raw-joint", "kfac", "ekfac"])
    p.add_argument("--damping", type=nonnegative_float,
                   help="curvature damping (default: the job's analysis.damping, else the preconditioner's)")
    p.add_argument("--absolute-damping", action="store_true", default=None,
                   help="damping is absolute, not relative to each module's mean eigenvalue")
    p.add_argument("--mode", choices=["dot", "cosine", "relative", "unit"])
    p.add_argument("--weighting", choices=["lr", "uniform", "last"], help="how checkpoints combine")
    p.add_argument("--top-k", type=positive_int, help="proponents and opponents kept per query (default: the job's, 10)")
    p.add_argument("--save-scores", action="store_true", help="also write the full score matrix (HDF5)")
    p.add_argument("--per-module", action="store_true",
                   help="also write per_module.json: each module's part of the proponents' scores")
    p.add_argument("--full-space-run", type=Path,
                   help="asymmetric preconditioning: a projection-none run of the same model whose queries "
                   "are preconditioned in full space, then projected like DIR's rows (mode dot)")
    p.add_argument("--out", type=Path, help="output folder (default: DIR)")
    p.add_argument("--work-dir", type=Path,
                   help="score in resumable parts kept here (default under torchrun: OUT/scoring); a run "
                   "interrupted mid-scoring redoes only its unfinished parts")
    p.add_argument("--part-rows", type=positive_int, help="train rows per part (default: about 64 parts)")
    p.add_argument("--overwrite", action="store_true", help="discard the parts of a different scoring job in the work dir")
    p.add_argument("--quiet", action="store_true")
    p = sub.add_parser(Command.CONTRIBUTE.value, help="score instruction data, fit a selector, select a subset",
                       formatter_class=_Formatter, description="Score a pool of instruction samples (in-context "
                       "contribution, LESS, IFD, baselines), learn the scores of a sample with a selector, select "
                       "the top and export it, as the config's contribution section says.")
    p.add_argument("config", type=Path, help="YAML config (see docs/configuration.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--project", default="contribution", help="directory under the config's root")
    p.add_argument("--overwrite", action="store_true", help="delete the project directory first")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser(Command.SELECT.value, help="select the top of a score table and export the subset",
                       formatter_class=_Formatter, description="Rank a pool by one score of a score table "
                       "(scores.jsonl / .csv: an id column and one column per score), write the top records in "
                       "the pool's own format, and a summary beside the length and random baselines.")
    p.add_argument("--scores", type=Path, required=True, help="score table (.jsonl or .csv)")
    p.add_argument("--pool", type=Path, required=True, help="the records: .jsonl, .json, or a datasets file/folder")
    p.add_argument("--by", required=True, help="score column to rank by (higher is better)")
    p.add_argument("--top-p", type=fraction, help="fraction of the scored examples to keep")
    p.add_argument("--top-k", type=positive_int, help="number of examples to keep")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--name", help="subset file name (.json: a JSON list)")  # default: SELECTED_FILE
    p.add_argument("--id-field", default="id", help="record field holding ids (content hashes when absent)")
    p.add_argument("--category-field", default="category", help="record field counted in the summary")
    p.add_argument("--output-field", default="output", help="record field holding the response")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p = sub.add_parser(Command.REPORT.value, help="write a self-contained HTML report of a project or run",
                       formatter_class=_Formatter, description="Write DIR/report.html: one self-contained file "
                       "(figures embedded, no network needed) showing, for an influence project or run, each query's "
                       "top proponents and opponents with their texts, score distributions, self-influence outliers "
                       "and per-module shares; for a contribution project, the score distributions, the selected "
                       "subset against the pool and the agreement with the baselines.")
    p.add_argument("run_dir", type=Path, help="project or run directory (logix run / influence / contribute)")
    p.add_argument("--out", type=Path, help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--title", help="page title (default: logix report - DIR's name)")
    p.add_argument("--top-k", type=positive_int, default=10, help="proponents per query when a bare run is scored here")
    p.add_argument("--max-queries", type=positive_int, default=500, help="queries shown (default: 500)")
    p.add_argument("--max-rows", type=positive_int, default=2000, help="selected examples listed (default: 2000)")
    p_inspect = sub.add_parser(Command.INSPECT.value, help="show what a run / project / store directory holds",
                               formatter_class=_Formatter)
    p_inspect.add_argument("run_dir", type=Path)
    p_verify = sub.add_parser(Command.VERIFY.value, help="check every stored byte of a run / project / store",
                              formatter_class=_Formatter, description="Check every store under DIR (manifests, "
                              "each shard's size and checksums, dataset shapes, duplicate ids) and every statistics "
                              "/ projection file against its checksum. Prints each damaged file by name; exits 1 "
                              "when one is found.")
    p_verify.add_argument("run_dir", type=Path, help="run, project or store directory")
    return parser


def cli_reference() -> str:
    """Markdown of every command's ``--help`` (docs/cli.md; a test keeps it in sync)."""
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["```text", parser.format_help().strip(), "```", ""]
    for name, command in sub.choices.items():
        parts += [f"### `logix {name}`", "", "```text", command.format_help().strip(), "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from logix.core.distributed import init_from_launcher, initialized

    command = Command(args.command)
    launched = command.distributed and not initialized() and init_from_launcher()  # a torchrun worker
    commands = {Command.RUN: cmd_run, Command.EXTRACT: cmd_extract, Command.INFLUENCE: cmd_influence,
                Command.INSPECT: cmd_inspect, Command.CONTRIBUTE: cmd_contribute,
                Command.SELECT: cmd_select, Command.REPORT: cmd_report, Command.VERIFY: cmd_verify}
    status = 0
    try:
        status = commands[command](args) or 0
    except (LogixError, OSError, KeyError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        print(f"logix: error: {reason}", file=sys.stderr)
        status = 1
    finally:
        if initialized():
            import torch.distributed

            torch.distributed.destroy_process_group()
    if launched:
        # A launcher's worker leaves now: its outputs are written (fsynced, renamed) and its process
        # group destroyed, but the interpreter's exit can abort in torch's C++ teardown on a loaded
        # machine ("terminate called without an active exception", exit -6, also before logix
        # changed anything here), which the launcher reports as a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())

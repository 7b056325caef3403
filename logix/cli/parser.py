"""The ``logix`` argument parser: commands, option types (a bad value is one line, exit code 2),
and the markdown reference of every command's ``--help`` (docs/cli.md)."""

from __future__ import annotations

import argparse
import enum
import math
from pathlib import Path

from logix.core.install import DISTRIBUTION, installed_version


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
    INDEX = "index"
    QUERY = "query"
    DAMPING = "damping"

    @property
    def distributed(self) -> bool:
        """Whether the command joins a ``torchrun`` launcher's process group."""
        return self in (Command.RUN, Command.EXTRACT, Command.INFLUENCE)


# ---- option values: checked by argparse, so a bad one is one line and exit code 2 ---------------
def _integer(text: str, least: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


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


class _Formatter(argparse.HelpFormatter):
    """Fixed width, so that ``--help`` (and docs/cli.md) reads the same on every terminal; an
    option's default is shown after its help unless the help already names it."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if action.option_strings and not any(default is v for v in (None, False, argparse.SUPPRESS)) \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="logix", description="logix: which training data made your "
                                     "model do what it does.", formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"logix {installed_version()} ({DISTRIBUTION})")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, help_text in ((Command.RUN, "fine-tune (or load) a model, log it, score influence"),
                               (Command.EXTRACT, "log a dataset with the model held fixed (no training)")):
        p = sub.add_parser(command.value, help=help_text, description=help_text, formatter_class=_Formatter)
        p.add_argument("config", type=Path, help="YAML config (see docs/configuration.md)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        p.add_argument("--project", default="job", help="directory under the config's root")
        p.add_argument("--overwrite", action="store_true", help="delete the project directory first")
        p.add_argument("--quiet", action="store_true", help="no progress bars" + (
            " and no training logs" if command is Command.RUN else ""))
        if command is Command.RUN:
            p.add_argument("--show", type=positive_int, default=5, help="queries printed (all are written)")
    p = sub.add_parser(Command.INFLUENCE.value, help="score logged queries against the train rows", formatter_class=_Formatter,
                       description="Score the queries logged in DIR (a run, or a job / Trainer project "
                       "whose checkpoints combine TracIn-style). Defaults come from DIR/job.yaml.")
    p.add_argument("run_dir", type=Path, help="run, or job / Trainer project directory")
    p.add_argument("--preconditioner", choices=["auto", "identity", "raw", "raw-joint", "kfac", "ekfac"],
                   help="curvature the scores are preconditioned with (default: the job's analysis.preconditioner, "
                   "else auto: ekfac, kfac or identity, the best the run logged)")
    p.add_argument("--damping", type=nonnegative_float,
                   help="curvature damping (default: the job's analysis.damping, else the preconditioner's)")
    p.add_argument("--absolute-damping", action="store_true", default=None,
                   help="damping is absolute, not relative to each module's mean eigenvalue")
    p.add_argument("--mode", choices=["dot", "cosine", "relative", "unit"],
                   help="dot: influence; cosine / unit: comparable across queries; relative: divided by the square "
                   "root of the train row's self-influence (default: the job's analysis.mode, else dot)")
    p.add_argument("--weighting", choices=["lr", "uniform", "last"],
                   help="how checkpoints combine: by learning rate, equally, or the last one only (default: the "
                   "job's analysis.checkpoints, else lr)")
    p.add_argument("--top-k", type=positive_int, help="proponents and opponents kept per query (default: the job's, 10)")
    p.add_argument("--save-scores", action="store_true", help="also write the full score matrix (HDF5)")
    p.add_argument("--use-index", action="store_true",
                   help="find the top-k through DIR's index (logix index) instead of scanning every row")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true",
                   help="print each query's record (the lines of influence.jsonl) as JSON lines on stdout; messages "
                   "go to stderr")
    p = sub.add_parser(Command.CONTRIBUTE.value, help="score instruction data, fit a selector, select a subset",
                       formatter_class=_Formatter, description="Score a pool of instruction samples (in-context "
                       "contribution, LESS, IFD, baselines), learn the scores of a sample with a selector, select "
                       "the top and export it, as the config's contribution section says.")
    p.add_argument("config", type=Path, help="YAML config (see docs/configuration.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--project", default="contribution", help="directory under the config's root")
    p.add_argument("--overwrite", action="store_true", help="delete the project directory first")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no training logs")
    p = sub.add_parser(Command.SELECT.value, help="select the top of a score table and export the subset",
                       formatter_class=_Formatter, description="Rank a pool by one score of a score table "
                       "(scores.jsonl / .csv: an id column and one column per score), write the top records in "
                       "the pool's own format, and a summary beside the length and random baselines.")
    p.add_argument("--scores", type=Path, required=True, help="score table (.jsonl or .csv)")
    p.add_argument("--pool", type=Path, required=True, help="the records: .jsonl, .json, or a datasets file/folder")
    p.add_argument("--by", required=True, help="score column to rank by (higher is better)")
    p.add_argument("--top-p", type=fraction, help="fraction of the scored examples to keep (this or --top-k)")
    p.add_argument("--top-k", type=positive_int, help="number of examples to keep (this or --top-p)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--name", help="subset file name, .jsonl or .json (a JSON list) (default: selected.jsonl)")
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
    p.add_argument("--max-queries", type=positive_int, default=500, help="queries shown")
    p.add_argument("--max-rows", type=positive_int, default=2000, help="selected examples listed")
    p_inspect = sub.add_parser(Command.INSPECT.value, help="show what a run / project / store directory holds",
                               formatter_class=_Formatter, description="Describe what DIR holds: a run (passes, "
                               "stores, statistics), a job / Trainer project (checkpoints, outputs, the last "
                               "checkpoint's run), a contribution project (scores, selection) or a single store.")
    p_inspect.add_argument("run_dir", type=Path, help="run, project or store directory")
    p_inspect.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
    p_verify = sub.add_parser(Command.VERIFY.value, help="check every stored byte of a run / project / store",
                              formatter_class=_Formatter, description="Check every store under DIR (manifests, "
                              "each shard's size and checksums, dataset shapes, duplicate ids) and every statistics "
                              "/ projection file against its checksum. Prints each damaged file by name; exits 1 "
                              "when one is found.")
    p_verify.add_argument("run_dir", type=Path, help="run, project or store directory")
    p = sub.add_parser(Command.INDEX.value, help="build an approximate top-k index of a run's train rows",
                       formatter_class=_Formatter, description="Index the train rows of DIR (a run, or a project "
                       "with one logged checkpoint) with faiss in one streaming pass, so that `logix query` and "
                       "`logix influence --use-index` find each query's top proponents without scanning every row "
                       "(candidates are re-scored exactly from the store). Saved in DIR's run/index/.")
    p.add_argument("run_dir", type=Path, help="run, or project with one logged checkpoint")
    p.add_argument("--kind", choices=["auto", "flat", "ivfflat", "ivfsq8", "ivfpq", "hnsw", "hnswsq4"],
                   default="auto", help="flat: exact; ivfflat / ivfsq8 / ivfpq: inverted lists of float32 rows / 8-bit "
                   "rows / PQ codes (about 1/13 of float32 rows' bytes); hnsw / hnswsq4: a graph over float32 / 4-bit "
                   "rows (for rows without cluster structure); auto: ivfpq, or hnswsq4 over dim/4 leading coordinates "
                   "when ivfpq's recall@10 on 100 sampled query rows is under 0.9")
    p.add_argument("--mode", choices=["dot", "cosine", "relative", "unit"], default="dot",
                   help="the scores whose top-k the index serves (dot and unit serve every preconditioner)")
    p.add_argument("--preconditioner", choices=["auto", "identity", "raw", "raw-joint", "kfac", "ekfac"], default="auto",
                   help="for cosine / relative: the preconditioner whose norms the rows are divided by")
    p.add_argument("--damping", type=nonnegative_float, help="for cosine / relative (default: the preconditioner's)")
    p.add_argument("--nlist", type=positive_int, help="inverted lists (default: about 4 sqrt(rows))")
    p.add_argument("--m", type=positive_int, help="ivfpq: parts per row, one code each (default: dim / 4)")
    p.add_argument("--nbits", type=positive_int, help="ivfpq: bits per code (default: 8)")
    p.add_argument("--hnsw-m", type=positive_int, help="hnsw*: links per node (default: 16)")
    p.add_argument("--train-rows", type=positive_int, help="ivf*: rows sampled to train on (default: 40 nlist)")
    p.add_argument("--reduce", type=positive_int, metavar="R",
                   help="index the rows' coordinates on their R leading eigenvectors (fewer bytes per row; "
                   "candidates are still re-scored exactly); default: all values")
    p.add_argument("--gpu", action="store_true",
                   help="require a GPU for the lists' k-means (faiss-gpu); by default one is used when faiss sees it")
    p.add_argument("--check", type=nonnegative_int, default=100, metavar="N",
                   help="after the build, measure recall@10 against the exact scan on N sampled query rows and warn "
                   "when it is below 0.9 (0: skip; costs one scan of the store)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser(Command.QUERY.value, help="top-k train rows of logged queries or new texts (JSON lines)",
                       formatter_class=_Formatter, description="For each query row logged in QUERIES (a run "
                       "directory's queries store; default: DIR's own), print one JSON line: the query id and its "
                       "top-k proponents (and opponents) with exact scores, found through DIR's index. With --text, "
                       "score new texts instead: their gradients are taken with the project's model (rebuilt from "
                       "its job.yaml, with the weights `logix run` saved or --model) and scored through the index "
                       "when one serves --mode, else by an exact scan.")
    p.add_argument("run_dir", type=Path, help="run, or project with one logged checkpoint, indexed by logix index")
    p.add_argument("--queries", type=Path, help="run directory (or store folder) holding the query rows "
                   "(default: DIR's own)")
    p.add_argument("--top-k", type=positive_int, default=10, help="rows per query")
    p.add_argument("--opponents", action="store_true", help="also the k most negative scores")
    p.add_argument("--preconditioner", choices=["auto", "identity", "raw", "raw-joint", "kfac", "ekfac"],
                   help="dot / unit indexes: the query's preconditioner (default: auto, the best the run logged)")
    p.add_argument("--damping", type=nonnegative_float, help="dot / unit indexes: damping (default: the preconditioner's)")
    p.add_argument("--nprobe", type=positive_int, help="ivf*: lists searched per query (default: nlist / 64)")
    p.add_argument("--rerank", type=positive_int, default=10,
                   help="candidates per result re-scored exactly (more: higher recall)")
    p.add_argument("--texts", action="store_true", help="add the examples' texts (from the project's job data)")
    p.add_argument("--text", action="append", metavar="TEXT",
                   help="a new text to score, language-model loss on all its tokens (repeat for several)")
    p.add_argument("--model", type=Path, help="--text: safetensors weights of the job's model (default: the "
                   "weights `logix run` saved, final_model.safetensors, or the job's model as built)")
    p.add_argument("--mode", choices=["dot", "cosine", "relative", "unit"], default="dot",
                   help="--text: score normalisation")
    p = sub.add_parser(Command.DAMPING.value, formatter_class=_Formatter,
                       help="choose the preconditioner and damping by LDS against retrained models",
                       description="Score the queries logged in DIR with each preconditioner at each damping and print "
                       "the LDS of each against GROUND_TRUTH: an .npz with masks (n_subsets x n_train booleans, "
                       "the subsets models were retrained on) and outputs (n_subsets x n_query, their outputs for the "
                       "logged queries, higher = better), as logix.analysis.retrain_on_subsets(..., cache=FILE) "
                       "writes it; an optional train_ids array names the run's id of each mask column (default: "
                       "column j is id j).")
    p.add_argument("run_dir", type=Path, help="a finalized run with train rows and logged queries")
    p.add_argument("ground_truth", type=Path, help=".npz with masks, outputs (and optionally train_ids)")
    p.add_argument("--dampings", type=nonnegative_float, nargs="+", metavar="D",
                   help="relative dampings to try (default: 0.001 0.003 0.01 0.03 0.1 0.3 1 3 10)")
    p.add_argument("--absolute-damping", action="store_true", help="the dampings are absolute, not relative")
    p.add_argument("--preconditioner", choices=["auto", "identity", "raw", "raw-joint", "kfac", "ekfac"],
                   nargs="+", metavar="P",
                   help="preconditioners to try, each at every damping: auto identity raw raw-joint kfac ekfac "
                   "(default: auto, the run's best logged; raw needs statistics.raw: true)")
    p.add_argument("--mode", choices=["dot", "cosine", "relative", "unit"], default="dot", help="score normalisation")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the table as JSON records")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def cli_reference() -> str:
    """Markdown of every command's ``--help`` (docs/cli.md; a test keeps it in sync)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = ["```text", parser.format_help().strip(), "```", ""]
    for name, command in sub.choices.items():
        parts += [f"### `logix {name}`", "", "```text", command.format_help().strip(), "```", ""]
    return "\n".join(parts)

"""The ``logix`` command line.

    logix run CONFIG [key.sub=value ...]        fine-tune (or load) a model, log, score influence
    logix extract CONFIG [key.sub=value ...]    log a dataset with the model held fixed (no training)
    logix influence DIR [options]               score the queries logged in DIR against its train rows
    logix inspect DIR                           what a run, project or store directory holds
    logix verify DIR                            check every stored byte; name each damaged file
    logix contribute CONFIG [key.sub=value ...] score instruction data, fit a selector, select a subset
    logix select --scores F --pool F --by NAME  select the top of a score table and export the subset
    logix report DIR                            a self-contained HTML report of a project or run
    logix index DIR [--kind ivfpq ...]          build an approximate top-k index of DIR's train rows
    logix query DIR [--queries RUN] --top-k K   top-k train rows of logged queries, by the index (JSON lines)

Every command exits 0 on success, and on a user error prints one line ``logix: error: ...``
to stderr and exits 1 (2 for a malformed command line, a bad option value included;
``logix verify`` exits 1 when it finds a damaged file).
"""

from logix.cli.main import main
from logix.cli.parser import Command, cli_reference

__all__ = ["Command", "cli_reference", "main"]

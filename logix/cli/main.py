"""``logix.cli.main``: parse, run one command, turn user errors into one line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

import logix.cli.commands as cmd
from logix.cli.parser import Command, build_parser
from logix.core.install import overwritten_message
from logix.errors import LogixError

HANDLERS = {Command.RUN: cmd.cmd_run, Command.EXTRACT: cmd.cmd_extract, Command.INFLUENCE: cmd.cmd_influence,
            Command.INSPECT: cmd.cmd_inspect, Command.CONTRIBUTE: cmd.cmd_contribute, Command.SELECT: cmd.cmd_select,
            Command.REPORT: cmd.cmd_report, Command.VERIFY: cmd.cmd_verify, Command.INDEX: cmd.cmd_index,
            Command.QUERY: cmd.cmd_query, Command.DAMPING: cmd.cmd_damping}


def main(argv: list[str] | None = None) -> int:
    """Run one ``logix`` command (the console script and ``python -m logix.cli`` call this).

    A user error (any :class:`~logix.errors.LogixError`, a missing file, a bad value) is printed
    as one line, ``logix: error: ...``, instead of a traceback. Under ``torchrun`` the commands that
    join a process group (``run``, ``extract``, ``influence``) start it from the launcher's
    environment, and the worker exits as soon as the command is done.

    Args:
        argv: The command line without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status: 0 on success, 1 on a user error (or when another distribution has
        overwritten files of this project). A malformed command line, ``--help`` and ``--version``
        raise ``SystemExit`` from the parser instead (status 2, 0, 0).
    """
    overwritten = overwritten_message()  # another distribution (logix-ai) replaced files of this project
    if overwritten:
        print(f"logix: error: {overwritten}", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from logix.core.distributed import init_from_launcher, initialized

    command = Command(args.command)
    launched = command.distributed and not initialized() and init_from_launcher()  # a torchrun worker
    status = 0
    try:
        status = HANDLERS[command](args) or 0
    except BrokenPipeError:  # the reader of stdout left (`logix query ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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


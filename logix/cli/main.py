"""``logix.cli.main``: parse, run one command, turn user errors into one line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

import logix.cli.commands as cmd
from logix.cli.parser import Command, build_parser
from logix.errors import LogixError

HANDLERS = {Command.RUN: cmd.cmd_run, Command.EXTRACT: cmd.cmd_extract, Command.INFLUENCE: cmd.cmd_influence,
            Command.INSPECT: cmd.cmd_inspect, Command.CONTRIBUTE: cmd.cmd_contribute, Command.SELECT: cmd.cmd_select,
            Command.REPORT: cmd.cmd_report, Command.VERIFY: cmd.cmd_verify, Command.INDEX: cmd.cmd_index,
            Command.QUERY: cmd.cmd_query}


def main(argv: list[str] | None = None) -> int:
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


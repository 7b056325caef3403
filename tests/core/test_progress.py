"""Progress on stderr: live bars on a terminal, plain lines (no escape sequences) anywhere else."""

from __future__ import annotations

import io
import sys

from logix.core import progress
from logix.core.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    assert not progress.interactive()
    assert list(progress_bar(range(5), desc="pass", unit="batch")) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert err.startswith("pass: 5/5 batch (100%), done after ") and err.count("\n") == 1
    bar = progress_bar(total=10, desc="influence", unit="row")
    assert isinstance(bar, LineProgress)
    bar.update(4)
    bar.close()
    bar.close()  # once
    err = capsys.readouterr().err
    assert err.startswith("influence: 4/10 row (40%), stopped after ") and err.count("\n") == 1
    assert list(progress_bar(range(3), desc="off", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_line_at_most_every_interval_while_running(capsys):
    bar = LineProgress(range(3), desc="pass", interval=0.0)  # every update prints
    assert list(bar) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["pass: 1/3 it (33%)", "pass: 2/3 it (67%)",
                                                       "pass: 3/3 it (100%)", "pass: 3/3 it (100%)"]
    assert "done after" in lines[-1] and not any("\x1b" in line or "\r" in line for line in lines)


def test_a_live_bar_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert progress.interactive()
    bar = progress_bar(total=3, desc="pass")
    assert not isinstance(bar, LineProgress)
    bar.update(3)
    bar.close()
    assert "pass" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm redraws in place
    progress.write("a message")
    assert "a message\n" in terminal.getvalue()

"""Progress output on stderr: a tqdm bar on a terminal (or in a notebook); anywhere else (a log
file, a pipe, CI) plain lines without escape sequences, so that nested bars (the Trainer's and a
logging pass's) do not fill a log with cursor movements.

    for batch in progress_bar(loader, desc="logix pass 1/2: statistics", unit="batch"):
        ...
    bar = progress_bar(total=n, desc="influence", unit="row")
    bar.update(k)
    bar.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

# Plain-line mode: at most one line per bar this often (seconds), and one line when it closes.
LINE_INTERVAL_S = 30.0


def interactive() -> bool:
    """Whether stderr shows a live bar: a terminal, or a notebook's output stream."""
    stream = sys.stderr
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def write(message: str) -> None:
    """A message on stderr that leaves an open bar intact (``tqdm.write`` on a terminal)."""
    if interactive():
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class LineProgress:
    """The part of tqdm's interface logix uses (iteration, ``update``, ``close``, ``with``), as
    plain lines on stderr: ``desc: n/total unit (pct) in s`` at most every ``interval`` seconds
    and once at the end."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", interval: float = LINE_INTERVAL_S) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.monotonic(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        elapsed = now - self.start
        rate = f", {self.n / elapsed:.3g} {self.unit}/s" if elapsed > 0 and self.n else ""
        finished = self.total is None or self.n >= self.total
        when = f"{'done' if finished else 'stopped'} after {elapsed:.1f} s" if done else f"{elapsed:.0f} s"
        print(f"{self.desc + ': ' if self.desc else ''}{count} {self.unit}{share}, {when}{rate}",
              file=sys.stderr, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True, leave: bool = False) -> Any:
    """A progress bar over ``iterable`` (or one advanced by ``update``) on stderr: tqdm where
    :func:`interactive`, else a :class:`LineProgress`; a silent one when not ``enabled``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit)

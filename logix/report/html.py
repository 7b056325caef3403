"""A self-contained static HTML report of a logix output directory.

One file: CSS and JS inline, figures as base64 PNGs, nothing fetched when it is opened. Every
text that comes from the data (queries, training examples, ids, module names) is HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from logix.report.assets import CSS, JS
from logix.report.data import ReportData, ReportKind, load
from logix.report.markup import esc
from logix.report.sections import contribution_body, influence_body
from logix.store.rundir import report_file


def render(data: ReportData, title: str | None = None, *, max_queries: int = 500, max_rows: int = 2000) -> str:
    """The report of ``data`` as one self-contained HTML string (figures embedded).

    Args:
        data: What :func:`logix.report.load` read.
        title: The page title (default ``logix report — <directory name>``).
        max_queries: Queries shown, the first ones (an influence report).
        max_rows: Selected examples listed, the first ones (a contribution report).

    Returns:
        The HTML page (:func:`logix.report.write_report` writes it to a file).
    """
    if data.kind is ReportKind.CONTRIBUTION:
        body, nav = contribution_body(data, max_rows)
        kind = "contribution scores and selection"
    else:
        body, nav = influence_body(data, max_queries)
        kind = "influence" + (" (scored from the run's stores)" if data.kind is ReportKind.RUN else "")
    title = title or f"logix report \u2014 {data.path.name}"
    links = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in nav)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body data-kind="{esc(data.kind)}"><header><h1>{esc(title)}</h1>'
        f'<div class="sub">{esc(kind)} \u00b7 {esc(data.path)} \u00b7 generated {now}</div></header>'
        f'<nav>{links}<input id="filter" type="search" placeholder="filter by text or id\u2026" '
        'aria-label="filter"><span id="filter-count"></span></nav>'
        f'<main>{body}</main><footer><span id="images-status"></span> \u00b7 made by <code>logix report</code>'
        f"</footer><script>{JS}</script></body></html>")


def write_report(directory: str | Path | ReportData, out: str | Path | None = None, *, title: str | None = None,
                 top_k: int = 10, max_queries: int = 500, max_rows: int = 2000) -> Path:
    """Write the HTML report of a logix output directory.

    Args:
        directory: an influence project (``logix run`` / ``logix influence``), a single run
            directory (its logged queries are scored here), or a contribution project
            (``logix contribute``); or what :func:`logix.report.load` returned.
        out: the HTML file (default ``DIRECTORY/report.html``).
        title: the page title (default ``logix report — <directory name>``).
        top_k: proponents and opponents per query when a single run is scored here.
        max_queries: queries shown (the page of thousands of queries would be slow to open).
        max_rows: selected examples listed for a contribution project.

    Returns:
        The path of the written file.

    Raises:
        ReportError: the directory holds nothing to report.
    """
    data = load(directory, top_k=top_k)
    out = Path(out) if out is not None else report_file(data.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(data, title, max_queries=max_queries, max_rows=max_rows), encoding="utf-8")
    tmp.replace(out)
    return out

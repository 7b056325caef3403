"""HTML building blocks of a report: escaping, number formats, text cells, tables, figures.

Every text that comes from the data goes through :func:`esc` (or :func:`text_cell`, which escapes).
"""

from __future__ import annotations

import math
from html import escape

from logix.report.data import ReportError
from logix.report.plots import figure_png_base64

SNIPPET = 160  # characters shown before "more"


def esc(value) -> str:
    """``value`` as HTML-escaped text (``None``: empty)."""
    return escape("" if value is None else str(value), quote=True)


def fmt(x, digits: int = 4) -> str:
    """A score for a table: 4 significant digits, scientific when very large or small."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "\u2013"
    x = float(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def pct(x) -> str:
    """A share as a percentage with one decimal (``None``: a dash)."""
    return "\u2013" if x is None else f"{100 * float(x):.1f}%"


def _compact(text: str) -> str:
    """Blank lines dropped (prompt templates put one between every section)."""
    return "\n".join(line for line in text.strip().split("\n") if line.strip()) if "\n" in text else text


def text_cell(text, fallback: str = "(text not available)") -> str:
    """Short text inline; long text truncated, the whole of it one click away."""
    if text is None or text == "":
        return f'<span class="muted">{esc(fallback)}</span>'
    text = _compact(str(text))
    if len(text) <= SNIPPET:
        return f'<div class="txt">{esc(text)}</div>'
    return (f'<details class="txt"><summary>{esc(text[:SNIPPET].rstrip())}\u2026 <span class="more">more</span>'
            f'</summary><div class="full">{esc(text)}</div></details>')


def figure_html(fig_fn, data, alt: str, caption: str = "") -> str:
    """``fig_fn(data)`` as an embedded PNG figure, or a note saying why there is none."""
    try:
        fig = fig_fn(data)
    except ReportError as exc:
        return f'<p class="note">{esc(exc)}</p>'
    b64 = figure_png_base64(fig)
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img class="plot" alt="{esc(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def table_html(headers: list[str], rows: list[list[str]], cls: str = "", row_attrs: list[str] | None = None) -> str:
    """A table of already-escaped cells; ``row_attrs`` are each row's ``<tr>`` attributes."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = row_attrs[i] if row_attrs else ""
        body.append(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def cards_html(items: list[tuple[str, str]]) -> str:
    """Key figures as cards: ``(label, value)`` pairs."""
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>' for k, v in items) + "</div>"


def notes_html(notes: list[str]) -> str:
    """What the directory lacks, as a list (nothing when it lacks nothing)."""
    if not notes:
        return ""
    items = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f'<div class="lacks"><strong>What this directory lacks</strong><ul>{items}</ul></div>'

"""The report's figures, each a :class:`matplotlib.figure.Figure` (shows inline in a notebook).

Every ``plot_*`` takes a directory (``str`` / ``Path``) or what :func:`logix.report.load`
returned, so ``logix.report.plot_self_influence("logix_runs/quickstart")`` works on its own.
Figures are built without ``pyplot``: no global state, no display backend needed.

Raises:
    ReportError: the directory lacks what the figure shows (the message says which file).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from logix.report.data import ReportData, ReportError, load, response_lengths

PROPONENT, OPPONENT, NEUTRAL, SELECTED, POOL = "#2e7d32", "#c62828", "#5c6bc0", "#ef6c00", "#90a4ae"


def _data(source) -> ReportData:
    return source if isinstance(source, ReportData) else load(source)


def _figure(width: float = 7.0, height: float = 3.4) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _label(text) -> str:
    """Data text as a literal matplotlib label (a ``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", alpha=0.25)


def _influence(source):
    data = _data(source)
    if data.influence is None:
        raise ReportError(f"{data.path} holds no influence scores (influence.jsonl): this figure is for "
                          "influence projects and runs.")
    return data, data.influence


def _contribution(source):
    data = _data(source)
    if data.contribution is None:
        raise ReportError(f"{data.path} holds no contribution scores (scores.jsonl / selection/summary.json): "
                          "this figure is for `logix contribute` projects.")
    return data, data.contribution


# ---- influence ---------------------------------------------------------------------------------
def plot_score_distribution(source) -> Figure:
    """Histogram of influence scores: the top-k proponents' (positive, green) and opponents'
    (negative, red) scores of every query, and every (query, train) pair when ``scores.h5`` was saved.

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        The figure: one panel, or two when the directory holds ``scores.h5``.

    Raises:
        ReportError: The directory holds no influence scores, or they list no proponent or opponent.
    """
    _, inf = _influence(source)
    pro = np.array([p["score"] for r in inf.queries for p in r.get("proponents", [])], dtype=float)
    opp = np.array([p["score"] for r in inf.queries for p in r.get("opponents", [])], dtype=float)
    if pro.size + opp.size == 0:
        raise ReportError("influence.jsonl lists no proponents or opponents.")
    panels = 2 if inf.all_scores is not None else 1
    fig = _figure(7.0 if panels == 1 else 10.0)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    both = np.concatenate([pro, opp])
    bins = np.linspace(both.min(), both.max(), 41) if both.max() > both.min() else 20
    axes[0].hist(pro, bins=bins, color=PROPONENT, alpha=0.8, label=f"top proponents (n={pro.size})")
    axes[0].hist(opp, bins=bins, color=OPPONENT, alpha=0.8, label=f"top opponents (n={opp.size})")
    axes[0].axvline(0, color="#333", lw=0.8, ls="--")
    axes[0].legend(fontsize=8, frameon=False)
    _style(axes[0], "Top-k scores of every query", "influence score  (> 0 helps the query)", "pairs")
    if panels == 2:
        flat = inf.all_scores.ravel()
        axes[1].hist(flat[np.isfinite(flat)], bins=60, color=NEUTRAL, alpha=0.85)
        axes[1].axvline(0, color="#333", lw=0.8, ls="--")
        axes[1].set_yscale("log")
        _style(axes[1], f"All scores (scores.h5, {flat.size:,} pairs)", "influence score", "pairs (log)")
    return fig


def self_influence_outliers(source, top: int = 20) -> list[dict]:
    """The ``top`` train examples of highest self-influence, each with a robust z-score of its
    log self-influence (median / MAD) and whether it is an outlier (z > 3).

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.
        top: How many examples to return.

    Returns:
        One dict per example, highest first: ``id``, ``self_influence``, ``z``, ``outlier``, ``text`` (or
        None) and ``copies`` (train examples with that same text). Empty without self-influence scores.

    Raises:
        ReportError: The directory holds no influence scores.
    """
    _, inf = _influence(source)
    if not inf.self_influence:
        return []
    ids = list(inf.self_influence)
    values = np.array([inf.self_influence[i] for i in ids], dtype=float)
    z = robust_z(values)
    order = np.argsort(-values)[:top]
    texts = inf.train_texts
    counts: dict[str, int] = {}
    for t in texts.values():
        counts[t] = counts.get(t, 0) + 1
    return [{"id": ids[i], "self_influence": float(values[i]), "z": float(z[i]), "outlier": bool(z[i] > 3),
             "text": texts.get(ids[i]), "copies": counts.get(texts.get(ids[i]), 0)} for i in order]


def robust_z(values: np.ndarray) -> np.ndarray:
    """Robust z-scores of ``log10(values)``: distance to the median in units of 1.4826 MAD."""
    logs = np.log10(np.clip(values, 1e-300, None))
    med = np.median(logs)
    mad = 1.4826 * np.median(np.abs(logs - med))
    return (logs - med) / (mad if mad > 0 else 1.0)


def plot_self_influence(source) -> Figure:
    """Histogram of self-influence ``g^T H^-1 g`` (log scale) with the outlier cut (robust z = 3).

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        The figure.

    Raises:
        ReportError: The directory holds no self-influence scores (``self_influence.csv``).
    """
    _, inf = _influence(source)
    if not inf.self_influence:
        raise ReportError("no self_influence.csv in this directory: set analysis.self_influence: true and "
                          "re-run `logix influence`.")
    values = np.array(list(inf.self_influence.values()), dtype=float)
    positive = values[values > 0]
    fig = _figure()
    ax = fig.subplots()
    if positive.size:
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 50)
        ax.hist(positive, bins=bins, color=NEUTRAL, alpha=0.85)
        ax.set_xscale("log")
        logs = np.log10(positive)
        med = np.median(logs)
        mad = 1.4826 * np.median(np.abs(logs - med)) or 1.0
        cut = 10 ** (med + 3 * mad)
        n_out = int((positive > cut).sum())
        ax.axvline(cut, color=OPPONENT, lw=1, ls="--", label=f"outlier cut (robust z = 3): {n_out} above")
        ax.axvline(10**med, color="#333", lw=0.8, ls=":", label="median")
        ax.legend(fontsize=8, frameon=False)
    _style(ax, f"Self-influence of {values.size:,} train examples", "self-influence g\u1d40H\u207b\u00b9g (log)",
           "examples")
    return fig


def per_module_shares(source) -> dict[str, float]:
    """Mean share of each module in the top proponents' scores (the parts sum to the score).

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        ``{module: mean share}``; empty without a per-module breakdown (``logix influence --per-module``).

    Raises:
        ReportError: The directory holds no influence scores.
    """
    _, inf = _influence(source)
    if not inf.per_module:
        return {}
    modules = inf.per_module["modules"]
    parts = np.array([[q["modules"][m] for m in modules] for q in inf.per_module["queries"]], dtype=float)
    total = parts.sum(axis=1, keepdims=True)  # (n_query, 1, k)
    share = np.where(np.abs(total) > 1e-30, parts / np.where(total == 0, 1, total), np.nan)
    return {m: float(np.nanmean(share[:, j, :])) for j, m in enumerate(modules)}


def plot_per_module(source) -> Figure:
    """Bar chart of the mean share of each logged module in the top proponents' scores.

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        The figure (see :func:`per_module_shares`).

    Raises:
        ReportError: The directory has no per-module breakdown (``logix influence DIR --per-module``).
    """
    shares = per_module_shares(source)
    if not shares:
        raise ReportError("no per-module breakdown here: `logix influence DIR --per-module` writes per_module.json.")
    names = list(shares)
    fig = _figure(7.0, max(2.2, 0.28 * len(names) + 1.2))
    ax = fig.subplots()
    vals = [shares[n] for n in names]
    ax.barh(range(len(names)), vals, color=[PROPONENT if v >= 0 else OPPONENT for v in vals])
    ax.set_yticks(range(len(names)), [_label(short_module(n)) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="#333", lw=0.8)
    _style(ax, "Per-module share of the top proponents' scores", "mean share of the score", "")
    ax.grid(axis="x", alpha=0.25)
    return fig


def short_module(name: str, width: int = 38) -> str:
    """``name`` cut to its last ``width`` characters (an ellipsis in front) when longer."""
    return name if len(name) <= width else "\u2026" + name[-(width - 1):]


# ---- contribution ------------------------------------------------------------------------------
def plot_contribution_scores(source, names: list[str] | None = None) -> Figure:
    """One histogram per score column (scored examples only), the selected subset in orange.

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.
        names: The score columns to plot, in this order (all of them when None); names the
            project lacks, and columns without a finite score, are left out.

    Returns:
        The figure, up to three panels a row.

    Raises:
        ReportError: Not a contribution project, or no column is left to plot.
    """
    _, con = _contribution(source)
    names = [n for n in (names or list(con.scores)) if n in con.scores]
    names = [n for n in names if np.isfinite(con.scores[n]).any()]
    if not names:
        raise ReportError("no score columns to plot (scores.jsonl is missing or empty).")
    selected = {r.get("id") for r in con.selected}
    is_sel = np.array([i in selected for i in con.ids])
    cols = min(3, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig = _figure(3.4 * cols, 2.5 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
        values = con.scores[name]
        ok = np.isfinite(values)
        bins = np.histogram_bin_edges(values[ok], bins=30)
        ax.hist(values[ok], bins=bins, color=POOL, label=f"scored ({ok.sum():,})")
        if is_sel.any():
            ax.hist(values[ok & is_sel], bins=bins, color=SELECTED, label=f"selected ({(ok & is_sel).sum():,})")
        ax.legend(fontsize=7, frameon=False)
        _style(ax, _label(name), "score (higher = better)", "examples")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    return fig


def plot_categories(source) -> Figure:
    """Share of each category in the pool and in the selected subset.

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        The figure.

    Raises:
        ReportError: Not a contribution project, or its summary has no categories (no category field).
    """
    _, con = _contribution(source)
    cats = (con.summary or {}).get("categories") or {}
    if not cats:
        raise ReportError("selection/summary.json has no categories (the pool has no category field).")
    names = sorted(cats)
    x = np.arange(len(names))
    fig = _figure(min(9.0, max(5.0, 0.5 * len(names) + 3)), 3.4)
    ax = fig.subplots()
    ax.bar(x - 0.2, [cats[n]["share_pool"] for n in names], 0.4, color=POOL, label="pool")
    ax.bar(x + 0.2, [cats[n]["share_selected"] for n in names], 0.4, color=SELECTED, label="selected")
    ax.set_xticks(x, [_label(n) for n in names], rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.legend(fontsize=8, frameon=False)
    _style(ax, "Category shares: pool vs selected", "category", "share")
    return fig


def plot_lengths(source) -> Figure:
    """Response length (characters) of the pool and of the selected subset: histograms when the
    pool's records are available, else the p10-p90 range, median and mean from the summary.

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        The figure.

    Raises:
        ReportError: Not a contribution project, or it has neither the pool's records nor their lengths.
    """
    _, con = _contribution(source)
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    if con.pool and con.selected:
        pool = response_lengths(con.pool.values())
        sel = response_lengths(con.selected)
        bins = np.histogram_bin_edges(pool, bins=40)
        ax.hist(pool, bins=bins, color=POOL, density=True, label=f"pool (n={pool.size:,})")
        ax.hist(sel, bins=bins, color=SELECTED, density=True, alpha=0.7, label=f"selected (n={sel.size:,})")
        ax.axvline(np.median(pool), color=POOL, ls="--", lw=1)
        ax.axvline(np.median(sel), color=SELECTED, ls="--", lw=1)
        ax.legend(fontsize=8, frameon=False)
        _style(ax, "Response length: pool vs selected (dashed: medians)", "response characters", "density")
    else:
        chars = (con.summary or {}).get("response_chars")
        if not chars:
            raise ReportError("no pool records and no response_chars in selection/summary.json.")
        for i, (name, color) in enumerate((("pool", POOL), ("selected", SELECTED))):
            q = chars[name]
            ax.plot([q["p10"], q["p90"]], [i, i], color=color, lw=6, solid_capstyle="butt")
            ax.plot([q["median"]], [i], "o", color="white", mec="#333")
            ax.plot([q["mean"]], [i], "D", color="#333", ms=4)
        ax.set_yticks([0, 1], ["pool", "selected"])
        _style(ax, "Response length: p10-p90 bar, median (o), mean (\u25c6)", "response characters", "")
    return fig


def plot_agreement(source) -> Figure:
    """Top-set overlap and Spearman correlation of the selection score with each other score.

    Args:
        source (str | Path | ReportData): A project or run directory, or what :func:`load` returned.

    Returns:
        The figure; the baselines' bars are hatched.

    Raises:
        ReportError: Not a contribution project, or its selection summary has no agreement section.
    """
    _, con = _contribution(source)
    agreement = (con.summary or {}).get("agreement") or {}
    if not agreement:
        raise ReportError("selection/summary.json has no agreement section.")
    names = list(agreement)
    x = np.arange(len(names))
    fig = _figure(min(9.0, max(5.5, 0.8 * len(names) + 2)), 3.2)
    ax = fig.subplots()
    overlap = [agreement[n].get("overlap") or 0.0 for n in names]
    rho = [agreement[n].get("spearman") if agreement[n].get("spearman") is not None else np.nan for n in names]
    hatch = ["//" if agreement[n].get("baseline") else "" for n in names]
    for xi, o, r, h in zip(x, overlap, rho, hatch):
        ax.bar(xi - 0.2, o, 0.4, color=SELECTED, hatch=h, edgecolor="white")
        ax.bar(xi + 0.2, r, 0.4, color=NEUTRAL, hatch=h, edgecolor="white")
    handles = [Patch(color=SELECTED, label="top-set overlap"), Patch(color=NEUTRAL, label="Spearman \u03c1"),
               Patch(facecolor="#b0b7c3", hatch="//", edgecolor="white", label="baseline")]
    ax.axhline(0, color="#333", lw=0.8)
    ax.set_xticks(x, [_label(n) for n in names], rotation=20, ha="right")
    ax.legend(handles=handles, fontsize=8, frameon=False, ncols=3)
    by = (con.summary or {}).get("by", "?")
    _style(ax, f"Agreement of '{_label(by)}' with the other scores", "", "overlap / correlation")
    return fig


# ---- helpers -----------------------------------------------------------------------------------
def figure_png_base64(fig: Figure) -> str:
    """The figure as a base64 PNG (what the HTML report embeds).

    Args:
        fig: A figure, e.g. one of the ``plot_*`` functions'.

    Returns:
        The PNG bytes (110 dpi), base64-encoded as ASCII text.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path

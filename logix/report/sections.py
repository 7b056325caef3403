"""The sections of a report page: an influence project's (or run's) and a contribution project's.

Each body function returns the page's ``<section>`` markup and its navigation links.
"""

from __future__ import annotations

import numpy as np

from logix.report.data import ReportData, record_text
from logix.report.markup import cards_html, esc, figure_html, fmt, notes_html, pct, table_html, text_cell
from logix.report.plots import (
    per_module_shares,
    plot_agreement,
    plot_categories,
    plot_contribution_scores,
    plot_lengths,
    plot_per_module,
    plot_score_distribution,
    plot_self_influence,
    robust_z,
    self_influence_outliers,
    short_module,
)

# ---- influence ---------------------------------------------------------------------------------
SIGN_HELP = (
    "<strong>Reading the scores.</strong> score(q, t) = g<sub>q</sub><sup>T</sup> (H + \u03bbI)<sup>-1</sup> "
    "g<sub>t</sub>. <span class='pos'>Positive</span>: t is a <em>proponent</em> \u2014 training more on it "
    "lowers the query's loss (it helps the query; removing it would hurt). <span class='neg'>Negative</span>: "
    "t is an <em>opponent</em> \u2014 training on it raises the query's loss. Raw (<code>dot</code>) scores scale "
    "with each query's loss, so compare them within a query, not across queries (<code>cosine</code> / "
    "<code>unit</code> modes compare across). Self-influence g<sub>t</sub><sup>T</sup> H<sup>-1</sup> "
    "g<sub>t</sub> \u2265 0; unusually large values flag mislabelled, duplicated or hard examples.")


def _entry_rows(entries: list[dict], texts: dict, per_module: dict | None, cls: str) -> str:
    if not entries:
        return '<p class="muted">none</p>'
    top = max(abs(float(e["score"])) for e in entries) or 1.0
    rows = []
    for rank, e in enumerate(entries, 1):
        score = float(e["score"])
        width = 100 * abs(score) / top
        bar = f'<div class="bar {cls}"><span style="width:{width:.1f}%"></span></div>'
        text = e.get("text") if e.get("text") is not None else texts.get(e["id"])
        module = ""
        if per_module is not None:
            parts = per_module.get(e["id"])
            if parts:
                best = max(parts, key=lambda m: abs(parts[m]))
                module = (f'<div class="muted small">largest part: {esc(short_module(best, 32))} '
                          f'({pct(parts[best] / score if score else None)})</div>')
        rows.append([str(rank), f'<code>{esc(e["id"])}</code>', f'<span class="score {cls}">{esc(fmt(score))}'
                     f"</span>{bar}", text_cell(text) + module])
    return table_html(["#", "id", "score", "text"], rows, cls=f"entries side-{cls}")


def _query_section(i: int, record: dict, texts: dict, per_module: dict | None) -> str:
    qid = record.get("query_id")
    qtext = record.get("query_text")
    pro, opp = record.get("proponents", []), record.get("opponents", [])
    search = " ".join(str(x) for x in [qid, qtext or "", *(f'{p["id"]} {p.get("text") or ""}' for p in pro + opp)])
    return (
        f'<section class="query filterable" id="q{i}" data-search="{esc(search.lower())}">'
        f'<h3><span class="qn">Query {i + 1}</span> <code>{esc(qid)}</code></h3>'
        f'<div class="qtext">{text_cell(qtext, "(query text not available)")}</div>'
        f'<div class="pair"><div><h4 class="pos">Top proponents <span class="muted">(help the query)</span></h4>'
        f'{_entry_rows(pro, texts, per_module, "pos")}</div>'
        f'<div><h4 class="neg">Top opponents <span class="muted">(hurt the query)</span></h4>'
        f'{_entry_rows(opp, texts, None, "neg")}</div></div></section>')


def influence_body(data: ReportData, max_queries: int) -> tuple[str, list[tuple[str, str]]]:
    inf = data.influence
    analysis = (data.job or {}).get("analysis") or {}
    n_train = len(inf.self_influence) if inf.self_influence else None
    k = max((len(r.get("proponents", [])) for r in inf.queries), default=0)
    cards = [("queries", f"{len(inf.queries):,}"), ("train examples", "\u2013" if n_train is None else f"{n_train:,}"),
             ("proponents / opponents per query", str(k))]
    if analysis:
        cards.append(("preconditioner \u00b7 mode", esc(f"{analysis.get('preconditioner')} \u00b7 {analysis.get('mode')}")))
    if inf.sanity:
        s = inf.sanity
        cards.append((f"top-{int(s.get('k', k))} proponents in the query's category (random)",
                      f"{pct(s.get('same_category'))} <span class='muted'>({pct(s.get('random'))})</span>"))
    parts, nav = [], []
    parts.append(f'<section id="overview"><h2>Overview</h2>{cards_html(cards)}<div class="help">{SIGN_HELP}</div>'
                 f'{notes_html(inf.notes)}</section>')
    nav.append(("overview", "Overview"))
    parts.append('<section id="distributions"><h2>Score distributions</h2>'
                 + figure_html(plot_score_distribution, data, "histogram of influence scores",
                           "Green: the top proponents' scores of every query; red: the top opponents'. Only the "
                           "top-k are in influence.jsonl; save the full matrix with --save-scores to see all pairs.")
                 + "</section>")
    nav.append(("distributions", "Distributions"))
    pm_index = _per_module_index(inf.per_module)
    queries = "".join(_query_section(i, r, inf.train_texts, pm_index.get(r.get("query_id")))
                      for i, r in enumerate(inf.queries[:max_queries]))
    cut = "" if len(inf.queries) <= max_queries else (
        f'<p class="note">Showing the first {max_queries:,} of {len(inf.queries):,} queries '
        "(<code>logix report --max-queries N</code> shows more).</p>")
    parts.append(f'<section id="queries"><h2>Queries <span class="muted">({len(inf.queries):,})</span></h2>'
                 f'{cut}{queries}</section>')
    nav.append(("queries", "Queries"))
    parts.append(_self_influence_section(data))
    nav.append(("self-influence", "Self-influence"))
    parts.append(_per_module_section(data))
    nav.append(("modules", "Modules"))
    return "".join(parts), nav


def _per_module_index(per_module: dict | None) -> dict:
    """query id -> train id -> module -> part of the score."""
    out: dict = {}
    if not per_module:
        return out
    for q in per_module.get("queries", []):
        ids = q.get("ids") or []
        out[q["query_id"]] = {tid: {m: vals[j] for m, vals in q["modules"].items()} for j, tid in enumerate(ids)}
    return out


def _self_influence_section(data: ReportData) -> str:
    inf = data.influence
    head = '<section id="self-influence"><h2>Self-influence outliers</h2>'
    if not inf.self_influence:
        return head + '<p class="note">No self-influence here (self_influence.csv is missing).</p></section>'
    rows_data = self_influence_outliers(data, top=20)
    rows = [[str(i), f"<code>{esc(r['id'])}</code>", esc(fmt(r["self_influence"])),
             f'<span class="{"flag" if r["outlier"] else ""}">{r["z"]:.1f}</span>',
             str(r["copies"]) if r["copies"] > 1 else "",
             text_cell(r["text"])] for i, r in enumerate(rows_data, 1)]
    attrs = [f' class="filterable{" outlier" if r["outlier"] else ""}" data-search="{esc(str(r["id"]) + " " + str(r["text"] or "")).lower()}"'
             for r in rows_data]
    table = table_html(["#", "id", "self-influence", "robust z", "copies", "text"], rows, "entries", attrs)
    n_out = sum(1 for z in robust_z(np.array(list(inf.self_influence.values()))) if z > 3)
    return (head + figure_html(plot_self_influence, data, "histogram of self-influence")
            + f"<p>The 20 train examples of largest self-influence. <strong>{n_out}</strong> of "
              f"{len(inf.self_influence):,} lie beyond a robust z of 3 (log scale, median / MAD): check them for "
              "wrong labels, duplicates (<em>copies</em>: identical texts in the training data) or unusual "
              "formats.</p>" + table + "</section>")


def _per_module_section(data: ReportData) -> str:
    head = '<section id="modules"><h2>Per-module contributions</h2>'
    shares = per_module_shares(data)
    if not shares:
        return head + (f'<p class="note">Not logged for this directory. <code>logix influence {esc(data.path)} '
                       "--per-module</code> writes per_module.json (each module's part of every top "
                       "proponent's score).</p></section>")
    rows = [[f"<code>{esc(m)}</code>", pct(v)] for m, v in sorted(shares.items(), key=lambda kv: -abs(kv[1]))]
    return (head + figure_html(plot_per_module, data, "per-module share of scores")
            + "<p>Each score is a sum over the logged modules; this is the mean share of each module in the top "
              "proponents' scores (shares of one score sum to 100%; a negative share pulls the other way).</p>"
            + table_html(["module", "mean share"], rows, "compact") + "</section>")


# ---- contribution ------------------------------------------------------------------------------
CONTRIB_HELP = (
    "<strong>Reading the scores.</strong> Every column is oriented so that <em>higher is better</em>: "
    "<code>icl</code> (in-context contribution: how much the example, shown as a demonstration, lowers the "
    "probes' loss), <code>less</code> (gradient similarity to the probes), <code>ifd</code> (instruction-following "
    "difficulty), <code>selector</code> (a model trained on a sample's scores, predicting the rest); "
    "<code>length</code> and <code>random</code> are baselines. Empty cells: the method did not score that example "
    "(only a sample is scored by the costly methods).")


def contribution_body(data: ReportData, max_rows: int) -> tuple[str, list[tuple[str, str]]]:
    con = data.contribution
    s = con.summary or {}
    sel_info = s.get("selector") or {}
    cards = [("pool", f"{s.get('pool', len(con.pool or {}) or len(con.ids)):,}"),
             ("scored", f"{s['scored']:,}" if "scored" in s else f"{len(con.ids):,}"),
             ("selected", f"{s['selected']:,}" if "selected" in s else f"{len(con.selected):,}"),
             ("ranked by", f"<code>{esc(s.get('by', '?'))}</code>")]
    if sel_info:
        cards.append((f"selector ({esc(sel_info.get('head'))} on {esc(sel_info.get('trained_on'))}) "
                      "held-out Spearman \u00b7 AUC",
                      f"{fmt(sel_info.get('spearman'), 3)} \u00b7 {fmt(sel_info.get('auc'), 3)}"))
    parts, nav = [], []
    parts.append(f'<section id="overview"><h2>Overview</h2>{cards_html(cards)}<div class="help">{CONTRIB_HELP}</div>'
                 f"{notes_html(con.notes)}</section>")
    nav.append(("overview", "Overview"))
    stats = []
    for name, values in con.scores.items():
        ok = values[np.isfinite(values)]
        if ok.size:
            q = np.percentile(ok, [10, 50, 90])
            stats.append([f"<code>{esc(name)}</code>", f"{ok.size:,}", fmt(ok.mean()), fmt(q[0]), fmt(q[1]), fmt(q[2])])
    parts.append('<section id="distributions"><h2>Score distributions</h2>'
                 + figure_html(plot_contribution_scores, data, "histograms of contribution scores",
                           "Grey: every scored example; orange: those in the selected subset.")
                 + (table_html(["score", "scored", "mean", "p10", "median", "p90"], stats, "compact") if stats else "")
                 + "</section>")
    nav.append(("distributions", "Distributions"))
    parts.append(_subset_section(data))
    nav.append(("subset", "Subset vs pool"))
    parts.append(_agreement_section(data))
    nav.append(("agreement", "Agreement"))
    parts.append(_selected_section(data, max_rows))
    nav.append(("selected", "Selected examples"))
    if con.probes:
        rows = [[f"<code>{esc(p.get('id'))}</code>", text_cell(record_text(p))] for p in con.probes]
        parts.append(f'<section id="probes"><h2>Probes <span class="muted">({len(con.probes)})</span></h2>'
                     "<p>The assessment examples the contribution scores are measured on.</p>"
                     f"<details><summary>show the probes</summary>{table_html(['id', 'text'], rows, 'entries')}"
                     "</details></section>")
        nav.append(("probes", "Probes"))
    return "".join(parts), nav


def _subset_section(data: ReportData) -> str:
    con = data.contribution
    s = con.summary or {}
    head = '<section id="subset"><h2>Selected subset vs the pool</h2>'
    if not s:
        return head + '<p class="note">No selection summary (selection/summary.json) in this directory.</p></section>'
    out = [head, '<div class="grid2">', figure_html(plot_categories, data, "category shares"),
           figure_html(plot_lengths, data, "response lengths"), "</div>"]
    cats = s.get("categories") or {}
    if cats:
        rows = [[esc(c), f"{v['pool']:,}", f"{v['selected']:,}", pct(v["share_pool"]), pct(v["share_selected"])]
                for c, v in sorted(cats.items())]
        out.append(table_html(["category", "pool", "selected", "share of pool", "share of selected"], rows, "compact"))
    chars = s.get("response_chars") or {}
    if chars:
        rows = [[name, *(fmt(chars[name][k], 3) for k in ("mean", "p10", "median", "p90"))]
                for name in ("pool", "selected") if name in chars]
        out.append(table_html(["response characters", "mean", "p10", "median", "p90"], rows, "compact"))
    return "".join(out) + "</section>"


def _agreement_section(data: ReportData) -> str:
    s = data.contribution.summary or {}
    head = '<section id="agreement"><h2>Agreement with the baselines and other scores</h2>'
    agreement = s.get("agreement") or {}
    if not agreement:
        return head + '<p class="note">No agreement section in selection/summary.json.</p></section>'
    compared = any(a.get("compared") is not None for a in agreement.values())
    rows = [[f"<code>{esc(n)}</code>" + (' <span class="tag">baseline</span>' if a.get("baseline") else ""),
             pct(a.get("overlap")), fmt(a.get("spearman"), 3)] + ([esc(a.get("compared", ""))] if compared else [])
            for n, a in agreement.items()]
    return (head + figure_html(plot_agreement, data, "agreement bars")
            + f"<p>Overlap: share of the top set by <code>{esc(s.get('by'))}</code> also in the top set of the other "
              "score (random expects the selected fraction). Spearman: rank correlation over the examples both "
              "scored.</p>" + table_html(["score", "top-set overlap", "Spearman \u03c1"] + (["compared"] if compared else []), rows, "compact")
            + "</section>")


def _selected_section(data: ReportData, max_rows: int) -> str:
    con = data.contribution
    s = con.summary or {}
    by = s.get("by")
    head = (f'<section id="selected"><h2>Selected examples <span class="muted">({len(con.selected):,})</span></h2>')
    if not con.selected:
        return head + '<p class="note">No selection/selected.jsonl in this directory.</p></section>'
    score_of = dict(zip(con.ids, con.scores[by].tolist())) if by in con.scores else {}
    rows, attrs = [], []
    for i, r in enumerate(con.selected[:max_rows], 1):
        text = record_text(r)
        rows.append([str(i), f"<code>{esc(r.get('id'))}</code>", esc(r.get("category", "")),
                     esc(fmt(score_of.get(r.get("id")))), text_cell(text)])
        attrs.append(f' class="filterable" data-search="{esc((str(r.get("id")) + " " + text).lower())}"')
    cut = "" if len(con.selected) <= max_rows else f" The first {max_rows:,} are shown (--max-rows)."
    return (head + f"<p>In rank order (highest score first), as exported to selection/selected.jsonl.{cut}</p>"
            + table_html(["#", "id", "category", esc(by or "score"), "text"], rows, "entries", attrs) + "</section>")

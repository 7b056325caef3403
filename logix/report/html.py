"""A self-contained static HTML report of a logix output directory.

One file: CSS and JS inline, figures as base64 PNGs, nothing fetched when it is opened. Every
text that comes from the data (queries, training examples, ids, module names) is HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
import math
from html import escape
from pathlib import Path

import numpy as np

from logix.report import plots
from logix.report.data import ReportData, ReportError, load, record_text

SNIPPET = 160  # characters shown before "more"


def _e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def fmt(x, digits: int = 4) -> str:
    """A score for a table: 4 significant digits, scientific when very large or small."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "\u2013"
    x = float(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "\u2013" if x is None else f"{100 * float(x):.1f}%"


def _compact(text: str) -> str:
    """Blank lines dropped (prompt templates put one between every section)."""
    return "\n".join(line for line in text.strip().split("\n") if line.strip()) if "\n" in text else text


def _text_cell(text, fallback: str = "(text not available)") -> str:
    """Short text inline; long text truncated, the whole of it one click away."""
    if text is None or text == "":
        return f'<span class="muted">{_e(fallback)}</span>'
    text = _compact(str(text))
    if len(text) <= SNIPPET:
        return f'<div class="txt">{_e(text)}</div>'
    return (f'<details class="txt"><summary>{_e(text[:SNIPPET].rstrip())}\u2026 <span class="more">more</span>'
            f'</summary><div class="full">{_e(text)}</div></details>')


def _figure(fig_fn, data, alt: str, caption: str = "") -> str:
    try:
        fig = fig_fn(data)
    except ReportError as exc:
        return f'<p class="note">{_e(exc)}</p>'
    b64 = plots.figure_png_base64(fig)
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img class="plot" alt="{_e(alt)}" src="data:image/png;base64,{b64}">{cap}</figure>'


def _table(headers: list[str], rows: list[list[str]], cls: str = "", row_attrs: list[str] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = row_attrs[i] if row_attrs else ""
        body.append(f"<tr{attrs}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{v}</div><div class="k">{k}</div></div>' for k, v in items) + "</div>"


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<div class="lacks"><strong>What this directory lacks</strong><ul>{items}</ul></div>'


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
                module = (f'<div class="muted small">largest part: {_e(plots._short_module(best, 32))} '
                          f'({_pct(parts[best] / score if score else None)})</div>')
        rows.append([str(rank), f'<code>{_e(e["id"])}</code>', f'<span class="score {cls}">{_e(fmt(score))}'
                     f"</span>{bar}", _text_cell(text) + module])
    return _table(["#", "id", "score", "text"], rows, cls=f"entries side-{cls}")


def _query_section(i: int, record: dict, texts: dict, per_module: dict | None) -> str:
    qid = record.get("query_id")
    qtext = record.get("query_text")
    pro, opp = record.get("proponents", []), record.get("opponents", [])
    search = " ".join(str(x) for x in [qid, qtext or "", *(f'{p["id"]} {p.get("text") or ""}' for p in pro + opp)])
    return (
        f'<section class="query filterable" id="q{i}" data-search="{_e(search.lower())}">'
        f'<h3><span class="qn">Query {i + 1}</span> <code>{_e(qid)}</code></h3>'
        f'<div class="qtext">{_text_cell(qtext, "(query text not available)")}</div>'
        f'<div class="pair"><div><h4 class="pos">Top proponents <span class="muted">(help the query)</span></h4>'
        f'{_entry_rows(pro, texts, per_module, "pos")}</div>'
        f'<div><h4 class="neg">Top opponents <span class="muted">(hurt the query)</span></h4>'
        f'{_entry_rows(opp, texts, None, "neg")}</div></div></section>')


def _influence_body(data: ReportData, max_queries: int) -> tuple[str, list[tuple[str, str]]]:
    inf = data.influence
    analysis = (data.job or {}).get("analysis") or {}
    n_train = len(inf.self_influence) if inf.self_influence else None
    k = max((len(r.get("proponents", [])) for r in inf.queries), default=0)
    cards = [("queries", f"{len(inf.queries):,}"), ("train examples", "\u2013" if n_train is None else f"{n_train:,}"),
             ("proponents / opponents per query", str(k))]
    if analysis:
        cards.append(("preconditioner \u00b7 mode", _e(f"{analysis.get('preconditioner')} \u00b7 {analysis.get('mode')}")))
    if inf.sanity:
        s = inf.sanity
        cards.append((f"top-{int(s.get('k', k))} proponents in the query's category (random)",
                      f"{_pct(s.get('same_category'))} <span class='muted'>({_pct(s.get('random'))})</span>"))
    parts, nav = [], []
    parts.append(f'<section id="overview"><h2>Overview</h2>{_cards(cards)}<div class="help">{SIGN_HELP}</div>'
                 f'{_notes(inf.notes)}</section>')
    nav.append(("overview", "Overview"))
    parts.append('<section id="distributions"><h2>Score distributions</h2>'
                 + _figure(plots.plot_score_distribution, data, "histogram of influence scores",
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
    rows_data = plots.self_influence_outliers(data, top=20)
    rows = [[str(i), f"<code>{_e(r['id'])}</code>", _e(fmt(r["self_influence"])),
             f'<span class="{"flag" if r["outlier"] else ""}">{r["z"]:.1f}</span>',
             str(r["copies"]) if r["copies"] > 1 else "",
             _text_cell(r["text"])] for i, r in enumerate(rows_data, 1)]
    attrs = [f' class="filterable{" outlier" if r["outlier"] else ""}" data-search="{_e(str(r["id"]) + " " + str(r["text"] or "")).lower()}"'
             for r in rows_data]
    table = _table(["#", "id", "self-influence", "robust z", "copies", "text"], rows, "entries", attrs)
    n_out = sum(1 for z in plots._robust_z(np.array(list(inf.self_influence.values()))) if z > 3)
    return (head + _figure(plots.plot_self_influence, data, "histogram of self-influence")
            + f"<p>The 20 train examples of largest self-influence. <strong>{n_out}</strong> of "
              f"{len(inf.self_influence):,} lie beyond a robust z of 3 (log scale, median / MAD): check them for "
              "wrong labels, duplicates (<em>copies</em>: identical texts in the training data) or unusual "
              "formats.</p>" + table + "</section>")


def _per_module_section(data: ReportData) -> str:
    head = '<section id="modules"><h2>Per-module contributions</h2>'
    shares = plots.per_module_shares(data)
    if not shares:
        return head + (f'<p class="note">Not logged for this directory. <code>logix influence {_e(data.path)} '
                       "--per-module</code> writes per_module.json (each module's part of every top "
                       "proponent's score).</p></section>")
    rows = [[f"<code>{_e(m)}</code>", _pct(v)] for m, v in sorted(shares.items(), key=lambda kv: -abs(kv[1]))]
    return (head + _figure(plots.plot_per_module, data, "per-module share of scores")
            + "<p>Each score is a sum over the logged modules; this is the mean share of each module in the top "
              "proponents' scores (shares of one score sum to 100%; a negative share pulls the other way).</p>"
            + _table(["module", "mean share"], rows, "compact") + "</section>")


# ---- contribution ------------------------------------------------------------------------------
CONTRIB_HELP = (
    "<strong>Reading the scores.</strong> Every column is oriented so that <em>higher is better</em>: "
    "<code>icl</code> (in-context contribution: how much the example, shown as a demonstration, lowers the "
    "probes' loss), <code>less</code> (gradient similarity to the probes), <code>ifd</code> (instruction-following "
    "difficulty), <code>selector</code> (a model trained on a sample's scores, predicting the rest); "
    "<code>length</code> and <code>random</code> are baselines. Empty cells: the method did not score that example "
    "(only a sample is scored by the costly methods).")


def _contribution_body(data: ReportData, max_rows: int) -> tuple[str, list[tuple[str, str]]]:
    con = data.contribution
    s = con.summary or {}
    sel_info = s.get("selector") or {}
    cards = [("pool", f"{s.get('pool', len(con.pool or {}) or len(con.ids)):,}"),
             ("scored", f"{s['scored']:,}" if "scored" in s else f"{len(con.ids):,}"),
             ("selected", f"{s['selected']:,}" if "selected" in s else f"{len(con.selected):,}"),
             ("ranked by", f"<code>{_e(s.get('by', '?'))}</code>")]
    if sel_info:
        cards.append((f"selector ({_e(sel_info.get('head'))} on {_e(sel_info.get('trained_on'))}) "
                      "held-out Spearman \u00b7 AUC",
                      f"{fmt(sel_info.get('spearman'), 3)} \u00b7 {fmt(sel_info.get('auc'), 3)}"))
    parts, nav = [], []
    parts.append(f'<section id="overview"><h2>Overview</h2>{_cards(cards)}<div class="help">{CONTRIB_HELP}</div>'
                 f"{_notes(con.notes)}</section>")
    nav.append(("overview", "Overview"))
    stats = []
    for name, values in con.scores.items():
        ok = values[np.isfinite(values)]
        if ok.size:
            q = np.percentile(ok, [10, 50, 90])
            stats.append([f"<code>{_e(name)}</code>", f"{ok.size:,}", fmt(ok.mean()), fmt(q[0]), fmt(q[1]), fmt(q[2])])
    parts.append('<section id="distributions"><h2>Score distributions</h2>'
                 + _figure(plots.plot_contribution_scores, data, "histograms of contribution scores",
                           "Grey: every scored example; orange: those in the selected subset.")
                 + (_table(["score", "scored", "mean", "p10", "median", "p90"], stats, "compact") if stats else "")
                 + "</section>")
    nav.append(("distributions", "Distributions"))
    parts.append(_subset_section(data))
    nav.append(("subset", "Subset vs pool"))
    parts.append(_agreement_section(data))
    nav.append(("agreement", "Agreement"))
    parts.append(_selected_section(data, max_rows))
    nav.append(("selected", "Selected examples"))
    if con.probes:
        rows = [[f"<code>{_e(p.get('id'))}</code>", _text_cell(record_text(p))] for p in con.probes]
        parts.append(f'<section id="probes"><h2>Probes <span class="muted">({len(con.probes)})</span></h2>'
                     "<p>The assessment examples the contribution scores are measured on.</p>"
                     f"<details><summary>show the probes</summary>{_table(['id', 'text'], rows, 'entries')}"
                     "</details></section>")
        nav.append(("probes", "Probes"))
    return "".join(parts), nav


def _subset_section(data: ReportData) -> str:
    con = data.contribution
    s = con.summary or {}
    head = '<section id="subset"><h2>Selected subset vs the pool</h2>'
    if not s:
        return head + '<p class="note">No selection summary (selection/summary.json) in this directory.</p></section>'
    out = [head, '<div class="grid2">', _figure(plots.plot_categories, data, "category shares"),
           _figure(plots.plot_lengths, data, "response lengths"), "</div>"]
    cats = s.get("categories") or {}
    if cats:
        rows = [[_e(c), f"{v['pool']:,}", f"{v['selected']:,}", _pct(v["share_pool"]), _pct(v["share_selected"])]
                for c, v in sorted(cats.items())]
        out.append(_table(["category", "pool", "selected", "share of pool", "share of selected"], rows, "compact"))
    chars = s.get("response_chars") or {}
    if chars:
        rows = [[name, *(fmt(chars[name][k], 3) for k in ("mean", "p10", "median", "p90"))]
                for name in ("pool", "selected") if name in chars]
        out.append(_table(["response characters", "mean", "p10", "median", "p90"], rows, "compact"))
    return "".join(out) + "</section>"


def _agreement_section(data: ReportData) -> str:
    s = data.contribution.summary or {}
    head = '<section id="agreement"><h2>Agreement with the baselines and other scores</h2>'
    agreement = s.get("agreement") or {}
    if not agreement:
        return head + '<p class="note">No agreement section in selection/summary.json.</p></section>'
    compared = any(a.get("compared") is not None for a in agreement.values())
    rows = [[f"<code>{_e(n)}</code>" + (' <span class="tag">baseline</span>' if a.get("baseline") else ""),
             _pct(a.get("overlap")), fmt(a.get("spearman"), 3)] + ([_e(a.get("compared", ""))] if compared else [])
            for n, a in agreement.items()]
    return (head + _figure(plots.plot_agreement, data, "agreement bars")
            + f"<p>Overlap: share of the top set by <code>{_e(s.get('by'))}</code> also in the top set of the other "
              "score (random expects the selected fraction). Spearman: rank correlation over the examples both "
              "scored.</p>" + _table(["score", "top-set overlap", "Spearman \u03c1"] + (["compared"] if compared else []), rows, "compact")
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
        rows.append([str(i), f"<code>{_e(r.get('id'))}</code>", _e(r.get("category", "")),
                     _e(fmt(score_of.get(r.get("id")))), _text_cell(text)])
        attrs.append(f' class="filterable" data-search="{_e((str(r.get("id")) + " " + text).lower())}"')
    cut = "" if len(con.selected) <= max_rows else f" The first {max_rows:,} are shown (--max-rows)."
    return (head + f"<p>In rank order (highest score first), as exported to selection/selected.jsonl.{cut}</p>"
            + _table(["#", "id", "category", _e(by or "score"), "text"], rows, "entries", attrs) + "</section>")


# ---- page --------------------------------------------------------------------------------------
CSS = """
:root{--pos:#2e7d32;--neg:#c62828;--ink:#1f2328;--muted:#667085;--line:#e4e7ec;--bg:#f7f8fa;--acc:#3949ab}
*{box-sizing:border-box}body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--ink);background:var(--bg)}header{background:#1f2a44;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:20px}header .sub{opacity:.8;font-size:13px}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;
display:flex;gap:16px;align-items:center;flex-wrap:wrap}nav a{color:var(--acc);text-decoration:none}
nav input{margin-left:auto;padding:6px 10px;border:1px solid #c8ccd4;border-radius:6px;width:280px}
#filter-count{color:var(--muted);font-size:12px}main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{margin-top:18px}h2{font-size:18px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}h4{font-size:13px;margin:10px 0 4px}
.query{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:12px 0}
.qn{color:var(--muted);font-weight:500}.qtext{background:var(--bg);border-radius:6px;padding:6px 10px;
white-space:pre-wrap}.pair{display:grid;grid-template-columns:1fr 1fr;gap:18px}
@media (max-width:1000px){.pair{grid-template-columns:1fr}}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th{text-align:left;font-weight:600;color:var(--muted);border-bottom:1px solid var(--line);padding:4px 6px}
td{border-bottom:1px solid #f0f1f4;padding:4px 6px;vertical-align:top}
table.compact{width:auto;min-width:420px;margin:8px 0}td code{font-size:12px;white-space:nowrap}
.txt{white-space:pre-wrap;word-break:break-word}details.txt summary{cursor:pointer;list-style:none}
details.txt summary::-webkit-details-marker{display:none}details[open].txt summary{display:none}
.more{color:var(--acc);font-size:12px}.score{font-variant-numeric:tabular-nums;font-weight:600}
.pos{color:var(--pos)}.neg{color:var(--neg)}.bar{height:4px;background:#eef0f3;border-radius:2px;margin-top:3px;
min-width:60px}.bar span{display:block;height:4px;border-radius:2px}.bar.pos span{background:var(--pos)}
.bar.neg span{background:var(--neg)}.muted{color:var(--muted);font-weight:400}.small{font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0}.card{background:#fff;border:1px solid var(--line);
border-radius:8px;padding:10px 14px;min-width:150px}.card .v{font-size:20px;font-weight:600}
.card .k{color:var(--muted);font-size:12px;max-width:260px}
.help{background:#eef2ff;border-left:4px solid var(--acc);padding:10px 14px;border-radius:4px;margin:10px 0}
.lacks{background:#fff8e1;border-left:4px solid #f9a825;padding:8px 14px;border-radius:4px;margin:10px 0}
.lacks ul{margin:4px 0 0;padding-left:20px}.note{background:#fff8e1;padding:8px 12px;border-radius:4px}
figure{margin:10px 0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
figure img{max-width:min(100%,980px);height:auto;display:block}figcaption{color:var(--muted);font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}tr.outlier td{background:#fff5f5}
.flag{color:var(--neg);font-weight:600}.tag{background:#eceff1;border-radius:4px;padding:0 5px;font-size:11px}
.hidden{display:none!important}footer{color:var(--muted);font-size:12px;text-align:center;padding:20px}
"""

JS = """
(function(){
  var box=document.getElementById('filter'), count=document.getElementById('filter-count');
  var items=Array.prototype.slice.call(document.querySelectorAll('.filterable'));
  function apply(){
    var words=box.value.toLowerCase().split(/\\s+/).filter(Boolean), shown=0;
    items.forEach(function(el){
      var hay=el.getAttribute('data-search')||'';
      var ok=words.every(function(w){return hay.indexOf(w)>=0;});
      el.classList.toggle('hidden',!ok); if(ok) shown++;
    });
    count.textContent=words.length? shown+' of '+items.length+' shown' : items.length+' items';
    document.body.setAttribute('data-shown', String(shown));
  }
  box.addEventListener('input', apply);
  var m=/[#&]filter=([^&]*)/.exec(location.hash);
  if(m){box.value=decodeURIComponent(m[1]);}
  apply();
  function images(){
    var imgs=document.querySelectorAll('img.plot'), ok=0;
    for(var i=0;i<imgs.length;i++){ if(imgs[i].complete && imgs[i].naturalWidth>0) ok++; }
    var out=document.getElementById('images-status');
    out.textContent=ok+' of '+imgs.length+' figures loaded';
    document.body.setAttribute('data-images-loaded', ok+'/'+imgs.length);
  }
  if(document.readyState==='complete') images(); else window.addEventListener('load', images);
})();
"""


def render(data: ReportData, title: str | None = None, *, max_queries: int = 500, max_rows: int = 2000) -> str:
    """The report of ``data`` as one HTML string (the first ``max_queries`` queries, the first
    ``max_rows`` selected examples)."""
    if data.kind == "contribution":
        body, nav = _contribution_body(data, max_rows)
        kind = "contribution scores and selection"
    else:
        body, nav = _influence_body(data, max_queries)
        kind = "influence" + (" (scored from the run's stores)" if data.kind == "run" else "")
    title = title or f"logix report \u2014 {data.path.name}"
    links = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f'<body data-kind="{_e(data.kind)}"><header><h1>{_e(title)}</h1>'
        f'<div class="sub">{_e(kind)} \u00b7 {_e(data.path)} \u00b7 generated {now}</div></header>'
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
    out = Path(out) if out is not None else data.path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(data, title, max_queries=max_queries, max_rows=max_rows), encoding="utf-8")
    tmp.replace(out)
    return out

"""`logix report` and `logix.report.plot_*`: the HTML is self-contained, escapes every data text,
and renders in headless Chromium (query sections, proponent rows, figures loaded, the filter box)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.figure import Figure
from torch import nn

import logix
from logix import report
from logix.cli import main as logix_main
from logix.contribution import ScoreTable, export_selection, load_pool, select
from logix.report import ReportError

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
ARTIFACTS = ROOT / "artifacts"
EVIL = '<script>alert("pwned")</script> & <b>bold</b>'


# ---- a small DOM for assertions ----------------------------------------------------------------
class _Node:
    def __init__(self, tag: str, attrs: dict, parent: _Node | None) -> None:
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[_Node]:
        return [n for n in self.iter() if n.tag == tag and (cls is None or cls in n.classes)]

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)


class _DOM(HTMLParser):
    VOID = {"meta", "img", "input", "br", "hr", "link", "source", "col", "wbr"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = _Node("#root", {}, None)
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        node = _Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def _dom(html: str) -> _Node:
    return _DOM(html).root


# ---- fixtures: output directories in the formats logix writes ----------------------------------
def _influence_dir(tmp_path: Path) -> Path:
    """influence.jsonl, self_influence.csv, sanity.json and per_module.json of 3 queries x 30 train rows."""
    d = tmp_path / "inf"
    d.mkdir()
    rng = np.random.default_rng(0)
    texts = {f"t{i}": f"### Instruction:\n\nTrain example {i}\n\n### Response: {i}" for i in range(30)}
    texts["t7"] = EVIL
    texts["t8"] = "long " * 100
    with open(d / "influence.jsonl", "w") as fh:
        for q in range(3):
            pro = [{"id": f"t{7 + i}", "score": float(10 - i), "text": texts[f"t{7 + i}"]} for i in range(4)]
            opp = [{"id": f"t{20 + i}", "score": float(-5 + i), "text": texts[f"t{20 + i}"]} for i in range(4)]
            qtext = EVIL if q == 1 else f"### Instruction:\nQuery {q}"
            fh.write(json.dumps({"query_id": f"q{q}", "query_text": qtext, "proponents": pro, "opponents": opp}) + "\n")
    values = rng.lognormal(0, 0.3, 30)
    values[12] = 1e4  # one clear outlier
    with open(d / "self_influence.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "self_influence"])
        for i, v in enumerate(values):
            w.writerow([f"t{i}", f"{v:.6e}"])
    (d / "sanity.json").write_text(json.dumps({"k": 4, "same_category": 0.5, "random": 0.25}))
    # module "a" carries 3/4 of every proponent's score, "<mod>" (an evil name) 1/4
    pm = {"modules": ["a", "<mod>"], "queries": [
        {"query_id": f"q{q}", "ids": [f"t{7 + i}" for i in range(4)],
         "modules": {"a": [0.75 * (10 - i) for i in range(4)], "<mod>": [0.25 * (10 - i) for i in range(4)]}}
        for q in range(3)]}
    (d / "per_module.json").write_text(json.dumps(pm))
    return d


def _contribution_dir(tmp_path: Path) -> Path:
    """A contribution project as `logix contribute` lays it out, from the library's own writers."""
    d = tmp_path / "contrib"
    records = [json.loads(x) for x in (DATA / "instructions.jsonl").read_text().splitlines()[:60]]
    records[5]["output"] = EVIL
    records[7]["category"] = "cost$_$"  # would be mathtext in a matplotlib label
    rng = np.random.default_rng(0)
    icl = rng.normal(size=60)
    icl[30:] = np.nan  # only a sample is scored
    icl[5] = 10.0  # the evil record is selected
    pool_path = tmp_path / "pool.jsonl"
    pool_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pool = load_pool(pool_path)
    table = ScoreTable(pool.ids, {"icl": icl, "length": np.array([len(r["output"]) for r in records], float),
                                  "random": rng.random(60), "selector": rng.normal(size=60),
                                  "p$\\frac$": rng.normal(size=60)})
    table.columns["selector"][5] = 10.0
    table.save(d / "scores.jsonl")
    selection = select(table, "selector", top_k=8, pool=pool, seed=0)
    export_selection(selection, pool, d / "selection")
    (d / "probes.jsonl").write_text(json.dumps({"id": "p0", "instruction": "probe <i>x</i>", "output": "y"}) + "\n")
    (d / "job.yaml").write_text(yaml.safe_dump({"data": {"train": str(pool_path), "id_field": "id"},
                                                "contribution": {"pool": ""}}))
    return d


def _bare_run(tmp_path: Path) -> Path:
    """logix.init + log_queries, no job: the report scores it itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    run = logix.init("bare", config={"statistics": {"kfac": True}}, root=tmp_path)
    run.watch(model)
    with run(data_id=list(range(16))):
        nn.functional.cross_entropy(model(x[:16]), y[:16], reduction="sum").backward()
    run.finalize()
    with run.log_queries(data_id=[f"q{i}" for i in range(4)]):
        nn.functional.cross_entropy(model(x[16:]), y[16:], reduction="sum").backward()
    run.finalize()
    return run.dir


# ---- the HTML ----------------------------------------------------------------------------------
def test_influence_report_content_and_escaping(tmp_path):
    d = _influence_dir(tmp_path)
    out = report.write_report(d)
    assert out == d / "report.html"
    html = out.read_text()
    dom = _dom(html)
    assert len(dom.find_all("section", "query")) == 3
    assert len(dom.find_all("table", "side-pos")) == 3
    assert sum(len(t.find_all("tr")) - 1 for t in dom.find_all("table", "side-pos")) == 12
    assert len(dom.find_all("img", "plot")) == 3  # distributions, self-influence, per-module
    assert all(img.attrs["src"].startswith("data:image/png;base64,") for img in dom.find_all("img"))
    # every data text is escaped: one <script> (the page's own), no <b> from the data
    assert len(dom.find_all("script")) == 1 and not dom.find_all("b")
    assert html.count("&lt;script&gt;alert(") >= 4 and "<script>alert" not in html
    assert EVIL in dom.all_text()
    assert "&lt;mod&gt;" in html and "<mod>" not in html
    # self-contained: nothing fetched
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # scores formatted, the outlier flagged, the per-module shares computed (75% / 25%)
    assert ">10<" in html and ">-5<" in html
    outliers = [r for r in dom.find_all("tr", "outlier")]
    assert len(outliers) == 1 and "t12" in outliers[0].all_text()
    assert "75.0%" in html and "25.0%" in html
    # long texts are truncated with the full text one click away
    long_cell = next(d for d in dom.find_all("details", "txt") if "long long" in d.all_text())
    assert len(long_cell.find_all("summary")[0].all_text()) < 200 and ("long " * 99).strip() in long_cell.all_text()
    assert "Positive" in html and "proponent" in html and "opponent" in html


def test_contribution_report_content(tmp_path):
    d = _contribution_dir(tmp_path)
    html = report.write_report(d, tmp_path / "c.html", title="pool <check>").read_text()
    dom = _dom(html)
    assert dom.find_all("title")[0].all_text() == "pool <check>"
    ids = [s.attrs["id"] for s in dom.find_all("section")]
    assert ids[:5] == ["overview", "distributions", "subset", "agreement", "selected"]
    selected = dom.find_all("section")[ids.index("selected")]
    rows = selected.find_all("tr", "filterable")
    summary = json.loads((d / "selection" / "summary.json").read_text())
    assert len(rows) == summary["selected"] == 8
    assert EVIL in selected.all_text() and len(dom.find_all("script")) == 1 and not dom.find_all("i")
    assert len(dom.find_all("img", "plot")) == 4  # scores, categories, lengths, agreement
    for name in ("icl", "length", "random", "selector", "p$\\frac$"):
        assert f"<code>{name}</code>" in html
    assert "cost$_$" in html  # the category table
    assert "What this directory lacks" not in html  # everything is there


def test_long_lists_are_capped(tmp_path):
    d = _influence_dir(tmp_path)
    html = report.write_report(d, max_queries=2).read_text()
    assert len(_dom(html).find_all("section", "query")) == 2 and "first 2 of 3 queries" in html
    c = _contribution_dir(tmp_path)
    html = report.write_report(c, max_rows=3).read_text()
    assert len(_dom(html).find_all("tr", "filterable")) == 3 and "The first 3 are shown" in html
    with pytest.raises(SystemExit) as exit_info:  # a bad option value: argparse's exit code 2
        logix_main(["report", str(d), "--max-queries", "0"])
    assert exit_info.value.code == 2


def test_report_says_what_a_directory_lacks(tmp_path):
    d = _influence_dir(tmp_path)
    (d / "per_module.json").unlink()
    (d / "self_influence.csv").unlink()
    html = report.render(report.load(d))
    assert "What this directory lacks" in html and "--per-module" in html and "self_influence.csv" in html
    with pytest.raises(ReportError, match="--per-module"):
        report.plot_per_module(d)
    with pytest.raises(ReportError, match="self_influence"):
        report.plot_self_influence(d)
    c = _contribution_dir(tmp_path)
    shutil.rmtree(c / "selection")
    html = report.render(report.load(c))
    assert "no selection/summary.json" in html and len(_dom(html).find_all("img", "plot")) == 1


def test_bare_run_is_scored_by_the_report(tmp_path):
    run_dir = _bare_run(tmp_path)
    data = report.load(run_dir, top_k=3)
    assert data.kind == "run" and [r["query_id"] for r in data.influence.queries] == ["q0", "q1", "q2", "q3"]
    assert set(data.influence.per_module["modules"]) == {"0", "2"}
    shares = report.per_module_shares(data)
    assert set(shares) == {"0", "2"}
    html = report.render(data)
    assert len(_dom(html).find_all("section", "query")) == 4 and "scored here" in html


def test_plots_return_labelled_figures(tmp_path):
    inf, con = _influence_dir(tmp_path), _contribution_dir(tmp_path)
    for fn, src in ((report.plot_score_distribution, inf), (report.plot_self_influence, inf),
                    (report.plot_per_module, inf), (report.plot_contribution_scores, con),
                    (report.plot_categories, con), (report.plot_lengths, con), (report.plot_agreement, con)):
        fig = fn(src)
        assert isinstance(fig, Figure), fn.__name__
        ax = fig.axes[0]
        assert ax.get_title(loc="left") and (ax.get_xlabel() or ax.get_ylabel()), fn.__name__
        assert report.figure_png_base64(fig).startswith("iVBOR")  # a PNG
    import h5py

    with h5py.File(inf / "scores.h5", "w") as fh:  # the full matrix (--save-scores): a second panel
        fh["scores"] = np.random.default_rng(0).normal(size=(3, 30)).astype(np.float32)
    fig = report.plot_score_distribution(inf)
    assert len(fig.axes) == 2 and "90 pairs" in fig.axes[1].get_title(loc="left")
    with pytest.raises(ReportError, match="contribution"):
        report.plot_categories(inf)
    with pytest.raises(ReportError, match="influence"):
        report.plot_score_distribution(con)
    top = report.self_influence_outliers(inf, top=3)
    assert top[0]["id"] == "t12" and top[0]["outlier"] and not top[2]["outlier"]


def test_report_errors(tmp_path, capsys):
    with pytest.raises(ReportError, match="is not a directory"):
        report.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="holds no logix outputs"):
        report.load(tmp_path / "empty")
    assert logix_main(["report", str(tmp_path / "empty")]) == 1
    assert "logix: error:" in capsys.readouterr().err
    d = _influence_dir(tmp_path)
    (d / "influence.jsonl").write_text('{"query_id": "q0", "propo')
    with pytest.raises(ReportError, match="line 1: not JSON"):
        report.load(d)


# ---- headless Chromium -------------------------------------------------------------------------
def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None and os.environ.get("LOGIX_CI"):
        pytest.fail("chromium is not installed (.ci/run installs it with apt-get)")
    if found is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def _browser(url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _rendered(path: Path, fragment: str = "") -> _Node:
    done = _browser(path.resolve().as_uri() + fragment, "--dump-dom")
    assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
    return _dom(done.stdout)


def _screenshot(path: Path, png: Path, height: int) -> None:
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    done = _browser(path.resolve().as_uri(), f"--screenshot={png}", f"--window-size=1280,{height}")
    assert done.returncode == 0 and png.stat().st_size > 20_000, done.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_chromium_renders_the_report_and_the_filter_works(tmp_path):
    _chromium()
    out = report.write_report(_influence_dir(tmp_path))
    body = _rendered(out).find_all("body")[0]
    assert body.attrs["data-images-loaded"] == "3/3"  # set by the page's JS once images decoded
    assert len(body.find_all("section", "query")) == 3
    assert len(body.find_all("script")) == 1 and not body.find_all("b")
    # the filter box: "#filter=..." fills it; only matching items stay visible
    body = _rendered(out, "#filter=pwned").find_all("body")[0]
    visible = [s for s in body.find_all("section", "query") if "hidden" not in s.classes]
    assert [s.attrs["id"] for s in visible] == ["q0", "q1", "q2"]  # t7 (evil text) is everyone's proponent
    body = _rendered(out, "#filter=q1").find_all("body")[0]
    visible = [s for s in body.find_all("section", "query") if "hidden" not in s.classes]
    count = next(s for s in body.find_all("span") if s.attrs.get("id") == "filter-count")
    assert [s.attrs["id"] for s in visible] == ["q1"] and count.all_text() == "1 of 23 shown"  # 3 queries, 20 outliers


@pytest.mark.slow
def test_chromium_contribution_report(tmp_path):
    _chromium()
    out = report.write_report(_contribution_dir(tmp_path))
    body = _rendered(out).find_all("body")[0]
    assert body.attrs["data-images-loaded"] == "4/4" and body.attrs["data-kind"] == "contribution"
    assert len(body.find_all("tr", "filterable")) == 8
    _screenshot(out, ARTIFACTS / "report_contribution.png", 2600)


@pytest.mark.slow
def test_report_of_a_tiny_job_in_chromium(tmp_path):
    """End to end: a tiny `logix run`, `logix influence --per-module`, `logix report`, then the
    rendered page in headless Chromium; the screenshot goes to artifacts/report.png."""
    _chromium()
    records = [json.loads(x) for x in (DATA / "instructions.jsonl").read_text().splitlines()[:40]]
    records[3]["output"] = EVIL
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = {
        "root": str(tmp_path / "runs"),
        "model": {"tokenizer": str(DATA / "tokenizer.json"),
                  "arch_config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64}},
        "data": {"train": str(tmp_path / "train.jsonl"), "queries": str(DATA / "queries.jsonl"),
                 "limit_queries": 6, "max_length": 64},
        "train": {"max_steps": 2, "batch_size": 16, "lr": 1e-3},
        "schedule": {"at_end": True, "batch_size": 16},
        "projection": {"rank_in": 4, "rank_out": 4},
        "analysis": {"top_k": 3},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    project = tmp_path / "runs" / "p"
    assert logix_main(["run", str(tmp_path / "job.yaml"), "--project", "p", "--quiet"]) == 0
    assert logix_main(["influence", str(project), "--per-module", "--quiet"]) == 0
    per_module = json.loads((project / "per_module.json").read_text())
    records_inf = [json.loads(x) for x in (project / "influence.jsonl").read_text().splitlines()]
    for q, rec in zip(per_module["queries"], records_inf):  # the parts sum to each proponent's score
        sums = np.sum([q["modules"][m] for m in per_module["modules"]], axis=0)
        np.testing.assert_allclose(sums, [p["score"] for p in rec["proponents"]], rtol=1e-4)
    assert logix_main(["report", str(project)]) == 0
    body = _rendered(project / "report.html").find_all("body")[0]
    assert len(body.find_all("section", "query")) == 6
    assert [len(t.find_all("tr")) - 1 for t in body.find_all("table", "side-pos")] == [3] * 6
    assert body.attrs["data-images-loaded"] == "3/3"
    assert len(body.find_all("script")) == 1 and not body.find_all("b")
    outlier_rows = body.find_all("section")[[s.attrs.get("id") for s in body.find_all("section")].index(
        "self-influence")].find_all("tr")
    assert len(outlier_rows) == 21  # header + the 20 largest, with their texts from the job's data
    assert "(text not available)" not in "".join(r.all_text() for r in outlier_rows)
    _screenshot(project / "report.html", ARTIFACTS / "report.png", 2400)
    # without influence.jsonl the report scores the project itself, with the job's analysis settings
    (project / "influence.jsonl").unlink()
    data = report.load(project, top_k=3)
    assert data.kind == "run"
    for mine, logged in zip(data.influence.queries, records_inf):
        assert mine["query_text"] == logged["query_text"] and mine["query_text"]
        assert [p["id"] for p in mine["proponents"]] == [p["id"] for p in logged["proponents"]]
        np.testing.assert_allclose([p["score"] for p in mine["proponents"]],
                                   [p["score"] for p in logged["proponents"]], rtol=1e-5)

"""Attribution quality without tuning: logix defaults, recipes and kronfluence on five tasks.

Tasks (``suite_tasks.py``): ``mlp`` and ``cnn`` (image-like) classifiers, ``text`` (a one-layer
transformer encoder classifier), ``lm`` (a tiny GPT-2 on four generated sequence families) and
``lora`` (a LoRA fine-tune of the text encoder on a shifted rule); and two added after the
defaults were chosen (``suite_holdout.py``): ``mlp-relu`` (a deeper ReLU MLP trained with SGD) and
``llama`` (a LLaMA-style causal LM). ``TUNING`` tasks are the ones a default may be chosen on; the
others are held out and only reported.

Protocol per task (``bench_lds``'s): train once from seed 0 on all train examples; retrain the
same recipe on ``--subsets`` random half subsets (``logix.analysis.retrain_on_subsets``, cached
under ``results/cache/``) from seed 0 (the ground truth) and from seed 1 (the noise ceiling: the
mean per-query Spearman agreement of the two seeds' outputs); LDS = mean over queries of the
Spearman correlation between each subset's summed scores and its measured output (the negated
summed query loss). Every method scores the same trained model:

* ``default``: ``logix.init(name)`` with no config (what a new user gets), scored with
  ``load_checkpoint``'s defaults (preconditioner and damping);
* ``none-ekfac`` / ``none-ekfac-true``: ``projection: none`` + EK-FAC (empirical / true Fisher),
  the same modules kronfluence tracks (Linear, Conv1D-as-Linear, Conv2d), over relative dampings;
  ``@def`` is the default damping;
* ``recipe-clf``: the docs' classifier recipe (pca 32, raw-joint, expected Fisher; classifiers
  whose row fits ``raw_max_dim``), ``recipe-lm``: ``configs/lm_influence.yaml`` (whitened 52,
  int4 rows, identity preconditioner);
* candidate projected settings (``--candidates``): what a default could be;
* ``logix-ai`` (``--logix-ai SITE``): LogIX 0.1.1 with its defaults, in a subprocess
  (``suite_logix_ai.py``); ``logix-ai-16`` / ``-raw`` / ``-nolora``: LoGra rank 16, its ``raw``
  Hessian, no LoGra;
* ``kron``: kronfluence 1.0.1 EK-FAC (true Fisher, its default) at its default damping (1e-8
  absolute) and its heuristic (``None``: 0.1 x mean eigenvalue, = logix's relative 0.1).

"best full-dim" is the best LDS over every unprojected logix setting and kronfluence at any
damping; each row's ``ratio`` is its LDS over that. Bytes/example is the stored train row (logix);
kronfluence stores no rows (it recomputes train gradients per query batch). Wall time: logging +
scoring (logix), factor fitting + scoring (kronfluence), on the same 1 torch thread.

    python benchmarks/bench_suite.py                    # ~25 min on 2 cores (ground truth cached)
    python benchmarks/bench_suite.py --tasks mlp cnn --subsets 48
    python benchmarks/plot_suite.py                     # LDS vs bytes per example
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lds import RESULTS, ground_truth, log_config, score_matrix  # noqa: E402
from suite_holdout import HOLDOUT  # noqa: E402
from suite_late import LATE  # noqa: E402
from suite_tasks import TASKS  # noqa: E402

import logix  # noqa: E402
from logix.analysis import lds, spearman  # noqa: E402

TUNING = ("mlp", "cnn")  # defaults may be chosen on these; text, lm and lora are held out
SEVEN = [*TASKS, *HOLDOUT]  # the default --tasks; mlp-relu and llama: added after the defaults were chosen
ALL_TASKS = {**TASKS, **HOLDOUT, **LATE}  # LATE (digits, tagger, gpt2b): added after every default was fixed
DAMPINGS = (None, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative; None: the preconditioner's default
FULL_TYPES = ["linear", "conv1d", "conv2d"]  # the modules kronfluence tracks (embeddings excluded)
# candidate defaults: label -> (config, [(preconditioner, damping)])
CANDIDATES = {
    "random16-ekfac": ({"projection": {"type": "random", "rank_in": 16, "rank_out": 16},
                        "statistics": {"ekfac": True}}, "ekfac"),
    "random16-ekfac-true": ({"projection": {"type": "random", "rank_in": 16, "rank_out": 16},
                             "statistics": {"ekfac": True, "fisher": "true"}}, "ekfac"),
    "pca32-ekfac-true": ({"projection": {"type": "pca", "rank_in": 32, "rank_out": 32},
                          "statistics": {"ekfac": True, "fisher": "true"}}, "ekfac"),
    "pca16-ekfac": ({"projection": {"type": "pca", "rank_in": 16, "rank_out": 16},
                     "statistics": {"ekfac": True}}, "ekfac"),
    "pca16-ekfac-true": ({"projection": {"type": "pca", "rank_in": 16, "rank_out": 16},
                          "statistics": {"ekfac": True, "fisher": "true"}}, "ekfac"),
    "whitened16": ({"projection": {"type": "whitened", "rank_in": 16, "rank_out": 16}}, "identity"),
    # the previous default's bytes per example (k=16 float32) spent on k=32 int8 rows; random32-int8-ekfac
    # was the default until the orthogonal projection replaced the Gaussian one
    "random32-int8-kfac": ({"projection": {"type": "random", "rank_in": 32, "rank_out": 32},
                            "store": {"dtype": "int8"}}, "kfac"),
    "random32-int8-ekfac": ({"projection": {"type": "random", "rank_in": 32, "rank_out": 32},
                             "store": {"dtype": "int8"}, "statistics": {"ekfac": True}}, "ekfac"),
    "pca32-int8-ekfac": ({"projection": {"type": "pca", "rank_in": 32, "rank_out": 32},
                          "store": {"dtype": "int8"}, "statistics": {"ekfac": True}}, "ekfac"),
    "whitened32-int8": ({"projection": {"type": "whitened", "rank_in": 32, "rank_out": 32},
                         "store": {"dtype": "int8"}}, "identity"),
    "random32-ekfac-true": ({"projection": {"type": "random", "rank_in": 32, "rank_out": 32},
                             "statistics": {"ekfac": True, "fisher": "true"}}, "ekfac"),
    # the LM preset (configs/lm_influence.yaml: whitened 52, int4) at <= 1/16 of the full row's bytes
    "whitened44-int4": ({"projection": {"type": "whitened", "rank_in": 44, "rank_out": 44},
                         "store": {"dtype": "int4"}, "statistics": {"ekfac": True}}, "identity"),
    "random48-int8-ekfac": ({"projection": {"type": "random", "rank_in": 48, "rank_out": 48},
                             "store": {"dtype": "int8"}, "statistics": {"ekfac": True}}, "ekfac"),
    "random64-int8-ekfac": ({"projection": {"type": "random", "rank_in": 64, "rank_out": 64},
                             "store": {"dtype": "int8"}, "statistics": {"ekfac": True}}, "ekfac"),
}
CANDIDATE_DAMPINGS = (None, 1e-3, 3e-3, 1e-2, 3e-2, 1.0)
# the defaults before this suite chose them: random (Gaussian) k16, KFAC, float32 rows, damping 0.1
PREVIOUS_DEFAULT = {"projection": {"type": "random", "rank_in": 16, "rank_out": 16}, "statistics": {"ekfac": False},
                    "store": {"dtype": "float32"}}


for _cfg, _pre in CANDIDATES.values():
    _cfg.setdefault("store", {"dtype": "float32"})


def methods(task) -> list[tuple[str, dict, list[tuple[str, float | None]]]]:
    """(label, logix config, [(preconditioner, relative damping)]) of every logix setting on ``task``."""
    full = {"projection": {"type": "none"}, "capture": {"types": FULL_TYPES}, "statistics": {"ekfac": True},
            "store": {"dtype": "float32"}}
    grid = [("ekfac", d) for d in DAMPINGS] + [("kfac", None)]
    out = [("default", {}, [("auto", d) for d in CANDIDATE_DAMPINGS]),  # logix.init(p) + influence(p) as shipped
           ("previous-default", PREVIOUS_DEFAULT, [("kfac", None)]),
           ("none-ekfac", full, grid),
           ("none-ekfac-true", {**full, "statistics": {"ekfac": True, "fisher": "true"}}, grid),
           ("recipe-lm", {"projection": {"type": "whitened", "rank_in": 52, "rank_out": 52},
                          "store": {"dtype": "int4"}, "statistics": {"ekfac": True}}, [("identity", None)])]
    if task.classes:
        out.append(("recipe-clf", {"projection": {"type": "pca", "rank_in": 32, "rank_out": 32},
                                   "store": {"dtype": "float32"},
                                   "statistics": {"raw_joint": True, "fisher": "expected",
                                                  "fisher_classes": task.classes}}, [("raw-joint", None)]))
    return out


def run_task(name: str, args, tmp: Path) -> dict:
    task = ALL_TASKS[name]()
    n = task.n_train
    model = task.train(np.ones(n, dtype=bool), 0)
    print(f"{name}: {n} train / {task.n_query} queries; retraining on {args.subsets} subsets x 2 seeds", flush=True)

    def train_out(mask, seed):
        return task.outputs(task.train(mask, seed))

    masks, outputs, gt_s = ground_truth(f"suite-{name}", task.recipe, train_out, n, args.subsets)
    _, outputs_b, _ = ground_truth(f"suite-{name}", task.recipe, train_out, n, args.subsets, seed=1)
    ceiling = float(np.nanmean(spearman(outputs, outputs_b)))

    def loss_fn(ids, query, labels):
        return task.loss(model, ids, query, labels)

    rows, kept = [], {}
    settings = methods(task) + [(c, cfg, [(pre, d) for d in CANDIDATE_DAMPINGS])
                                for c, (cfg, pre) in CANDIDATES.items() if c in args.candidates]
    for label, config, scorings in settings:
        if args.proj_seed and config.get("projection", {}).get("type") != "none":  # the default config too
            config = {**config, "projection": {**config.get("projection", {}), "seed": args.proj_seed}}
        if task.modules:
            config = {**config, "capture": {**config.get("capture", {}), "modules": list(task.modules)}}
        start = time.perf_counter()
        try:
            run_dir = log_config(tmp, f"{name}-{label}", model, loss_fn, n, task.n_query, config)
        except logix.LogixError as exc:  # e.g. raw-joint over raw_max_dim
            print(f"  {label}: skipped ({type(exc).__name__}: {str(exc)[:100]})", flush=True)
            continue
        log_s = time.perf_counter() - start
        store = logix.load_run_store(run_dir)
        per_example = store.nbytes() // store.n_rows
        for pre, d in scorings:
            start = time.perf_counter()
            scores = score_matrix(run_dir, pre, d, tmp)
            if label == "none-ekfac-true" and pre == "ekfac" and d is None:
                kept["logix"] = scores
            rows.append({"method": label, "preconditioner": pre, "damping": d, "lds": lds(scores, masks, outputs).mean,
                         "bytes_per_example": int(per_example), "log_s": log_s,
                         "score_s": time.perf_counter() - start, "full_dim": label.startswith("none")})
        print(f"  {label:<20} {per_example:>8} B/ex  best LDS {max(r['lds'] for r in rows if r['method'] == label):.3f}"
              f"  (logged in {log_s:.1f}s)", flush=True)
    if not args.no_kron:
        from suite_kron import kron_scores

        k = kron_scores(task, model, tmp, (1e-8, None))
        for d, scores in k["scores"].items():
            rows.append({"method": "kron", "preconditioner": "ekfac", "damping": "heuristic" if d is None else d,
                         "lds": lds(scores, masks, outputs).mean, "bytes_per_example": None, "log_s": k["fit_s"],
                         "score_s": k["score_s"][d], "full_dim": True})
        a, b = kept["logix"].ravel(), k["scores"][None].ravel()
        parity = {"pearson": float(np.corrcoef(a, b)[0, 1]),
                  "rel_err": float(np.linalg.norm(a - b) / np.linalg.norm(b))}
        got = ", ".join(f"{r['damping']}: {r['lds']:.3f}" for r in rows[-2:])
        print(f"  kron                 LDS {got} ({k['fit_s']:.1f}s fit)", flush=True)
    best_full = max(r["lds"] for r in rows if r["full_dim"])
    for r in rows:
        r["ratio"] = r["lds"] / best_full
    if args.logix_ai:  # LogIX 0.1.1 in a subprocess (its package is also named logix)
        from suite_logix_ai import logix_ai_rows

        rows += logix_ai_rows(task, model, tmp, args.logix_ai, [16], masks, outputs, best_full)
    return {"role": "tuning" if name in TUNING else "held-out", "n_train": n, "n_query": task.n_query,
            "n_subsets": args.subsets, "recipe": task.recipe, "noise_ceiling": ceiling, "ground_truth_s": gt_s,
            "best_full_dim": best_full, "rows": rows, "kron_parity": parity if not args.no_kron else None}


def pick(rows: list[dict], method: str, pre: str | None = None, damping="default") -> dict | None:
    """The row of ``method`` (and preconditioner / damping; ``"default"``: the default damping, None)."""
    d = None if damping == "default" else damping
    for r in rows:
        if r["method"] == method and (pre is None or r["preconditioner"] == pre) and r["damping"] == d:
            return r
    return None


def summary(tasks: dict) -> dict:
    """Per method setting: LDS ratio per task and the minimum over tuning / held-out / all tasks."""
    keys = sorted({(r["method"], r["preconditioner"], str(r["damping"])) for t in tasks.values() for r in t["rows"]})
    out = {}
    for key in keys:
        ratios = {name: r["ratio"] for name, t in tasks.items() for r in t["rows"]
                  if (r["method"], r["preconditioner"], str(r["damping"])) == key and r["ratio"] is not None}
        if len(ratios) < len(tasks):
            continue
        tune = [v for n, v in ratios.items() if tasks[n]["role"] == "tuning"]
        held = [v for n, v in ratios.items() if tasks[n]["role"] != "tuning"]
        out["/".join(key)] = {**ratios, "min_tuning": min(tune, default=np.nan),
                              "min_held_out": min(held, default=np.nan), "min": min(ratios.values())}
    return out


def print_table(tasks: dict) -> None:
    names = list(tasks)
    print("\nLDS per task (ratio to the best full-dimension LDS); bytes per stored train example")
    print(f"{'method':<34}" + "".join(f"{n:>20}" for n in names))
    lines = [("noise ceiling (2 seeds)", lambda t: f"{t['noise_ceiling']:.3f}"),
             ("best full-dim (any damping)", lambda t: f"{t['best_full_dim']:.3f}")]
    for label, pre, d in [("default", "auto", "default"), ("previous-default", "kfac", "default"),
                          ("none-ekfac", "ekfac", "default"),
                          ("none-ekfac-true", "ekfac", "default"), ("kron", "ekfac", "heuristic"),
                          ("kron", "ekfac", 1e-8), ("recipe-clf", "raw-joint", "default"),
                          ("recipe-lm", "identity", "default"), ("logix-ai", "kfac", "default")]:
        def cell(t, label=label, pre=pre, d=d):
            r = pick(t["rows"], label, pre, d)
            if r is None or r["lds"] is None:
                return "-"
            b = "" if r["bytes_per_example"] is None else f" {r['bytes_per_example'] // 1024}K" \
                if r["bytes_per_example"] >= 10240 else f" {r['bytes_per_example']}B"
            return f"{r['lds']:.3f} ({r['ratio']:.2f}){b}"
        lines.append((f"{label} {pre} @{d}", cell))
    for label, fn in lines:
        print(f"{label:<34}" + "".join(f"{fn(tasks[n]):>20}" for n in names))


MARKDOWN_ROWS = [  # (label in the docs, method, preconditioner, damping)
    ("**logix defaults** (`logix.init(name)`: orthogonal k32, EK-FAC in one pass, int8 rows, damping 0.01)",
     "default", "auto", "default"),
    ("previous defaults (random k16, KFAC, float32 rows, damping 0.1)", "previous-default", "kfac", "default"),
    ("`projection: none` + EK-FAC, default damping", "none-ekfac", "ekfac", "default"),
    ("`projection: none` + EK-FAC, `fisher: true`", "none-ekfac-true", "ekfac", "default"),
    ("kronfluence 1.0.1 EK-FAC, damping heuristic", "kron", "ekfac", "heuristic"),
    ("kronfluence 1.0.1 EK-FAC, default damping 1e-8", "kron", "ekfac", 1e-8),
    ("recipe: classifier (pca 32, raw-joint, expected)", "recipe-clf", "raw-joint", "default"),
    ("recipe: `configs/lm_influence.yaml` (whitened 52, int4)", "recipe-lm", "identity", "default"),
    ("random (Gaussian) k32 int8 + KFAC, damping 0.01", "random32-int8-kfac", "kfac", 1e-2),
    ("random (Gaussian) k32 int8 + EK-FAC, damping 0.01 (the defaults before the orthogonal projection)",
     "random32-int8-ekfac", "ekfac", 1e-2),
    ("pca k32 int8 + EK-FAC, damping 0.01", "pca32-int8-ekfac", "ekfac", 1e-2),
    ("LogIX 0.1.1 (logix-ai), its defaults (LoGra: random LoRA rank 64 per layer, KFAC, damping 0.1 x mean eigenvalue)",
     "logix-ai", "kfac", "default"),
    ("LogIX 0.1.1, LoGra rank 16, KFAC", "logix-ai-16", "kfac", "default"),
]


def markdown(report: dict) -> str:
    """The docs' table: per task LDS (ratio to the best full-dim LDS), bytes/example, seconds."""
    tasks = report["tasks"]
    head = "| setting | " + " | ".join(f"{n} ({t['role']})" for n, t in tasks.items()) + " | worst ratio |"
    lines = [head, "|---" * (len(tasks) + 2) + "|",
             "| noise ceiling (2 retraining seeds) | " + " | ".join(f"{t['noise_ceiling']:.3f}" for t in tasks.values())
             + " | |",
             "| best full-dimension LDS (any damping, logix or kronfluence) | "
             + " | ".join(f"{t['best_full_dim']:.3f}" for t in tasks.values()) + " | 1 |"]
    for label, method, pre, d in MARKDOWN_ROWS:
        cells, ratios = [], []
        for t in tasks.values():
            r = pick(t["rows"], method, pre, d)
            if r is None or r["lds"] is None:  # not run, or the method cannot run on the task (``error``)
                cells.append("-" if r is None else "- (fails)")
                continue
            ratios.append(r["ratio"])
            size = "no rows" if r["bytes_per_example"] is None else f"{r['bytes_per_example']:,} B"
            cells.append(f"{r['lds']:.3f} ({r['ratio']:.2f}) · {size} · {r['log_s'] + r['score_s']:.1f} s")
        worst = f"{min(ratios):.2f}" if len(ratios) == len(tasks) else f"({min(ratios):.2f})" if ratios else "-"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {worst} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=SEVEN, choices=list(ALL_TASKS))
    ap.add_argument("--subsets", type=int, default=48, help="half-subset retrainings per seed")
    ap.add_argument("--candidates", nargs="*", default=list(CANDIDATES), help="candidate default settings")
    ap.add_argument("--no-kron", action="store_true", help="skip kronfluence")
    ap.add_argument("--logix-ai", type=Path, metavar="SITE",
                    help="also run LogIX 0.1.1 installed with pip --target SITE (suite_logix_ai.py)")
    ap.add_argument("--proj-seed", type=int, default=0, help="projection.seed of every projected setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_suite.json")
    ap.add_argument("--markdown", type=Path, help="print the docs' table from this JSON and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = {}
    for name in args.tasks:
        with tempfile.TemporaryDirectory() as tmp:
            tasks[name] = run_task(name, args, Path(tmp))
        partial = {"tasks": tasks, "partial": True}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(partial, indent=1, default=str) + "\n")
    print_table(tasks)
    summ = summary(tasks)
    print(f"\nworst-case ratio (min over tasks of LDS / best full-dim), best first\n{'setting':<40}"
          + "".join(f"{n:>7}" for n in tasks) + f"{'tune':>7}{'held':>7}{'min':>7}")
    for key, v in sorted(summ.items(), key=lambda kv: -kv[1]["min"])[:25]:
        print(f"{key:<40}" + "".join(f"{v[n]:>7.3f}" for n in tasks)
              + f"{v['min_tuning']:>7.3f}{v['min_held_out']:>7.3f}{v['min']:>7.3f}")
    report = {"tasks": tasks, "summary": summ, "wall_s": time.perf_counter() - start, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "platform": platform.platform()}
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwall {report['wall_s']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()

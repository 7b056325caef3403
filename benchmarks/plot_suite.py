"""Plot LDS (as a fraction of the best full-dimension LDS) against bytes per stored train example.

    python benchmarks/plot_suite.py  # reads results/bench_suite.json, writes docs/img/suite_lds_bytes.png

One panel per task; each point is one logix setting at its default damping (the label names it),
the horizontal line is the best full-dimension LDS (any damping, logix or kronfluence), the dotted
line the noise ceiling (two retraining seeds), the dashed line kronfluence EK-FAC at its damping
heuristic (no stored rows: drawn as a line).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "bench_suite.json")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img" / "suite_lds_bytes.png")
    args = ap.parse_args()
    tasks = json.loads(args.json.read_text())["tasks"]
    cols = 3
    rows = -(-len(tasks) // cols)
    fig = Figure(figsize=(10, 3.2 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    for ax, (name, t) in zip(axes, tasks.items()):
        for r in t["rows"]:
            if r["damping"] is not None or r["bytes_per_example"] is None:
                continue
            if r["method"].startswith("none") and r["preconditioner"] != "ekfac":
                continue
            color = "tab:red" if r["method"] == "default" else "tab:green" if r["method"].startswith("recipe") \
                else "tab:gray" if r["full_dim"] else "tab:blue"
            ax.scatter(r["bytes_per_example"], r["lds"], color=color, s=18, zorder=3)
            ax.annotate(r["method"], (r["bytes_per_example"], r["lds"]), fontsize=5, xytext=(2, 2),
                        textcoords="offset points")
        ax.axhline(t["best_full_dim"], color="k", lw=0.8, label="best full-dim")
        ax.axhline(t["noise_ceiling"], color="k", lw=0.8, ls=":", label="noise ceiling")
        kron = [r for r in t["rows"] if r["method"] == "kron" and r["damping"] == "heuristic"]
        if kron:
            ax.axhline(kron[0]["lds"], color="tab:purple", lw=0.8, ls="--", label="kronfluence EK-FAC")
        ax.set_xscale("log")
        ax.set_title(f"{name} ({t['role']})", fontsize=9)
        ax.set_xlabel("bytes per train example", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes[::cols]:
        ax.set_ylabel("LDS")
    axes[0].legend(fontsize=6, loc="lower right")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

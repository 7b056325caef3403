"""Plot the storage / accuracy / time trade-off of ``bench_lm_quality.py`` from its JSON.

    python benchmarks/plot_lm_quality.py  # reads results/bench_lm_quality.json, writes docs/img/lm_quality.png

Left: LDS against stored bytes per train example (log scale), one line per projection and
store dtype, each point the best symmetric preconditioner and damping of that setting (the
per-module allocations A1/A2 and asymmetric preconditioning are left out: the first were tuned
on the ground truth, the second lost everywhere); lines join the square ranks k x k, uneven rank
pairs are unjoined markers. Horizontal lines: full-dimension EK-FAC and 0.95x of it; the vertical
line is 1/16 of the full row. Right: the scoring time of the same points (one timing each, so
noisy) against the number of stored dimensions, which is what scoring cost follows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

HERE = Path(__file__).resolve().parent
STYLE = {"random": ("tab:blue", "o"), "pca": ("tab:green", "s"), "whitened": ("tab:red", "^")}
DASH = {"float32": "-", "int8": "--", "int4": ":"}


def best_points(rows: list[dict]) -> dict[tuple[str, str], list[tuple[int, float, float, int, bool]]]:
    """``(projection, dtype) -> [(bytes, lds, score_s, dims, square)]`` over uniform ranks, the
    best symmetric cell of each."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        if r["projection"] == "none" or r["asymmetric"] or r["k_out"] == "alloc":
            continue
        key = (r["projection"], r.get("store_dtype", "float32"), r["k_in"], r["k_out"])
        if key not in cells or r["lds"] > cells[key]["lds"]:
            cells[key] = r
    lines: dict[tuple[str, str], list] = {}
    for (projection, dtype, _, _), r in cells.items():
        lines.setdefault((projection, dtype), []).append(
            (r["bytes_per_example"], r["lds"], r["score_s"], r["dims"], r["k_in"] == r["k_out"]))
    return {k: sorted(v) for k, v in lines.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "bench_lm_quality.json")
    ap.add_argument("--out", type=Path, default=HERE.parent / "docs" / "img" / "lm_quality.png")
    args = ap.parse_args()
    report = json.loads(args.json.read_text())
    finish = report["finish_line"]
    reference = finish["reference_lds"]
    full_bytes = finish["best"]["bytes_per_example"] / finish["best"]["fraction"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_lds, ax_time = fig.subplots(1, 2)
    for (projection, dtype), points in sorted(best_points(report["rows"]).items()):
        color, marker = STYLE[projection]
        label = f"{projection}, {dtype}"
        square = [p for p in points if p[4]]
        ax_lds.plot([p[0] for p in square], [p[1] for p in square], DASH[dtype], color=color, marker=marker, ms=4,
                    label=label)
        uneven = [p for p in points if not p[4]]
        ax_lds.plot([p[0] for p in uneven], [p[1] for p in uneven], marker, color=color, ms=4, mfc="none")
        ax_time.plot([p[3] for p in points], [1e3 * p[2] for p in points], marker, color=color, ms=4,
                     mfc="none" if dtype == "float32" else color, alpha=0.8, label=label)
    ax_lds.axhline(reference, color="black", lw=1, label=f"full-dimension EK-FAC ({reference:.3f})")
    ax_lds.axhline(0.95 * reference, color="gray", lw=1, ls="--", label="0.95x of it")
    if report.get("noise_ceiling"):
        ax_lds.axhline(report["noise_ceiling"], color="gray", lw=1, ls=":", label="seed agreement (ceiling)")
    ax_lds.axvline(full_bytes / 16, color="purple", lw=1, ls="-.", label="1/16 of the full row")
    ax_lds.set_xlabel("stored bytes per train example")
    ax_time.set_xlabel("stored dimensions per train example")
    for ax in (ax_lds, ax_time):
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    ax_lds.set_ylabel("LDS (best symmetric preconditioner)")
    ax_time.set_ylabel("scoring time, ms (320 train x 64 queries)")
    ax_lds.set_title("Accuracy vs storage, tiny GPT-2 LM task")
    ax_time.set_title("Scoring time of the same settings")
    ax_lds.legend(fontsize=7, loc="lower right")
    ax_time.legend(fontsize=7, loc="upper left")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

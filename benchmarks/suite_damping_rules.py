"""Damping rules for EK-FAC on the suite's tasks: fixed relative dampings against adaptive ones.

An adaptive rule sets each module's damping from its EK-FAC spectrum ``s`` (the eigenvalue
corrections). The family measured here: ``c * mean(s) * f**p`` with ``f`` the fraction of ``s``
under ``eps * mean(s)`` (the share of curvature directions the training gradients leave null):
a module with a full spectrum is left almost undamped, a mostly null one is damped near its mean
eigenvalue. Every rule scores the same logged runs of each task (``projection: none`` + EK-FAC,
empirical and true Fisher, and the default projected rows); the LDS protocol and the cached ground
truth are ``bench_suite.py``'s. ``abs1e-8`` is kronfluence's default damping.

Choose on the tuning tasks (``--tasks mlp cnn``), report on the others, e.g.

    python benchmarks/suite_damping_rules.py --tasks mlp cnn text lm lora mlp-relu llama
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lds import RESULTS, ground_truth, log_config, score_matrix  # noqa: E402
from bench_suite import ALL_TASKS, FULL_TYPES  # noqa: E402

from logix.analysis import lds  # noqa: E402
from logix.config import damping as damping_module  # noqa: E402


def null_fraction(s: torch.Tensor, eps: float) -> torch.Tensor:
    return (s < eps * s.mean()).double().mean()


def relative(c: float):
    return lambda s: c * s.mean()


def adaptive(eps: float, p: int, c: float):
    return lambda s: c * s.mean() * null_fraction(s, eps) ** p


RULES = {f"mean*{c:g}": relative(c) for c in (0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)}
RULES["abs1e-8"] = lambda s: torch.tensor(1e-8)
RULES.update({f"null{eps:g}^{p}*{c:g}": adaptive(eps, p, c) for eps in (1e-3, 1e-2) for c in (0.1, 0.3, 1.0)
              for p in (1, 2, 3)})


class _RuleDamping:
    """Routes ``Damping.resolve`` through one rule while scoring (the library has no hook for it)."""

    def __init__(self) -> None:
        self.rule = None
        self._resolve = damping_module.Damping.resolve

    def __enter__(self):
        outer = self

        def resolve(damping, spectrum):
            return float(outer.rule(spectrum.flatten().double()))

        damping_module.Damping.resolve = resolve
        return self

    def __exit__(self, *exc) -> None:
        damping_module.Damping.resolve = self._resolve


def run_task(name: str, subsets: int, tmp: Path) -> dict:
    task = ALL_TASKS[name]()
    n = task.n_train
    model = task.train(np.ones(n, dtype=bool), 0)
    masks, outputs, _ = ground_truth(f"suite-{name}", task.recipe, lambda m, s: task.outputs(task.train(m, s)), n,
                                     subsets)

    def loss_fn(ids, query, labels):
        return task.loss(model, ids, query, labels)

    full = {"projection": {"type": "none"}, "capture": {"types": FULL_TYPES}, "statistics": {"ekfac": True},
            "store": {"dtype": "float32"}}
    configs = {"none-ekfac": full, "none-ekfac-true": {**full, "statistics": {"ekfac": True, "fisher": "true"}},
               "default": {}}
    out = {}
    for label, config in configs.items():
        if task.modules:
            config = {**config, "capture": {**config.get("capture", {}), "modules": list(task.modules)}}
        run_dir = log_config(tmp, f"{name}-{label}", model, loss_fn, n, task.n_query, config)
        with _RuleDamping() as hook:
            for rule, fn in RULES.items():
                hook.rule = fn
                out[f"{label}/{rule}"] = float(lds(score_matrix(run_dir, "ekfac", 0.1, tmp), masks, outputs).mean)
        print(f"{name:<9}{label:<16}" + " ".join(f"{r}:{out[f'{label}/{r}']:.3f}" for r in list(RULES)[:9]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=list(ALL_TASKS))
    ap.add_argument("--subsets", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_suite-damping-rules.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            report[name] = run_task(name, args.subsets, Path(tmp))
    best = {}
    suite = RESULTS / "bench_suite.json"
    if suite.exists():
        best = {t: v["best_full_dim"] for t, v in json.loads(suite.read_text())["tasks"].items()}
    for label in ("none-ekfac", "none-ekfac-true", "default"):
        print(f"\n{label}: LDS per task (worst ratio to bench_suite.json's best full-dim LDS)")
        print(f"{'rule':<18}" + "".join(f"{t:>10}" for t in report) + f"{'worst':>8}")
        for rule in RULES:
            values = {t: report[t][f"{label}/{rule}"] for t in report}
            worst = min((v / best[t] for t, v in values.items() if t in best), default=float("nan"))
            print(f"{rule:<18}" + "".join(f"{v:>10.3f}" for v in values.values()) + f"{worst:>8.3f}")
    args.out.write_text(json.dumps({"rules": list(RULES), "lds": report}, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

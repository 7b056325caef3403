"""LogIX 0.1.1 (PyPI ``logix-ai``, the seed system) on ``bench_suite``'s tasks, side by side with logix.

``logix-ai`` installs a top-level package also named ``logix``, so it runs in a subprocess whose
``sys.path`` starts with its own install (``--site``). The parent (this repo's env) trains each
task's model exactly as ``bench_suite`` does (seed 0, every train example; GPT-2's ``Conv1D``
layers become ``nn.Linear`` as for kronfluence: LogIX tracks Linear / Conv1d / Conv2d, and its
LoRA has no Conv1D), pickles it with the train / query inputs and targets, and the child runs
LogIX with its defaults, the usage of its examples:

    run = LogIX(project)                        # no config: LoRA rank 64 (per layer min(64, in, out)), random init
    run.watch(model); run.add_lora()            # LoGra: the watched modules become A (random) -> B (0) -> C (random)
    run.setup({"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
    with run(data_id=ids): summed train loss .backward()    # per-example projected gradients + K-FAC covariances
    run.finalize()
    run.eval(); run.setup({"grad": ["log"]}); with run(data_id=qids): summed query loss .backward()
    run.compute_influence_all(run.get_log(), run.build_log_dataloader())   # hessian "auto" (KFAC), damping None

(damping ``None``: 0.1 x the mean eigenvalue of the first module's Kronecker eigenvalue matrix,
then reused for every module: ``precondition_kfac`` assigns its ``damping`` argument in the loop;
rows are float32, its ``log_dtype`` default). Every
supported module is watched (``lora``: only the peft adapters, the modules kronfluence tracks and
the only ones retrained). The scores are (n_query, n_train) g_q^T H^-1 g_train of the summed loss,
positive = helps the query, as logix's. ``--rank`` adds LoGra ranks besides the default.

    pip install --no-deps --ignore-requires-python --target /tmp/logixai/site logix-ai==0.1.1
    python benchmarks/suite_logix_ai.py --site /tmp/logixai/site      # updates results/bench_suite.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def variants(ranks: list[int]) -> list[tuple[str, int | None, str]]:
    """(key, LoRA rank (None: LogIX's default 64; 0: no LoGra, the watched gradients), hessian) of the LogIX runs."""
    return [("default", None, "kfac"), ("raw", None, "raw"), ("nolora", 0, "kfac")] + [(str(r), r, "kfac")
                                                                                     for r in ranks]


# ---- child: LogIX's env (``import logix`` is LogIX 0.1.1) ---------------------------------------
def child(work: Path, ranks: list[int]) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.modules["bench_lds"] = types.SimpleNamespace(CLF={}, LM={}, clf_data=None, clf_train=None, lm_data=None,
                                                     lm_train=None)  # suite_tasks' model classes, without our logix
    sys.path.insert(1, str(HERE))
    import suite_tasks  # noqa: F401  (unpickling the text / lora models needs suite_tasks.Encoder)

    from logix import LogIX
    from logix import __file__ as logix_file
    from logix.config import LoRAConfig

    torch.set_num_threads(1)
    data = torch.load(work / "data.pt", weights_only=False)
    lm = data["kind"] == "lm"

    def loss_of(model, x, y):
        if lm:
            logits, target = model(input_ids=x).logits[:, :-1], x[:, 1:]
        else:
            logits, target = model(x), y
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")

    out = {"logix_file": logix_file}

    def one(key, rank, hessian):
        torch.manual_seed(int(os.environ.get("SUITE_LOGIX_AI_SEED", "0")))  # its LoRA projections' draw
        model = torch.load(work / "model.pt", weights_only=False).eval()
        start = time.perf_counter()
        run = LogIX(f"{data['name']}-{key}")
        run.watch(model, name_filter=data["modules"])
        if rank != 0:  # LogIXScheduler(lora="random"): the default LoRAConfig (rank 64, random init)
            run.add_lora(lora_config=None if rank is None else LoRAConfig(rank=rank))
        run.save(True)  # LogIXScheduler(save="grad")
        run.setup({"grad": ["log", "covariance"]} if hessian == "raw"
                  else {"grad": ["log"], "forward": ["covariance"], "backward": ["covariance"]})
        xt, yt = data["xt"], data["yt"]
        for lo in range(0, len(xt), 64):
            ids = list(range(lo, min(lo + 64, len(xt))))
            with run(data_id=[str(i) for i in ids]):
                model.zero_grad()
                loss_of(model, xt[ids], None if yt is None else yt[ids]).backward()
        run.finalize()
        log_s = time.perf_counter() - start
        start = time.perf_counter()
        run.eval()
        run.setup({"grad": ["log"]})
        with run(data_id=[f"q{i}" for i in range(len(data["xq"]))]):
            model.zero_grad()
            loss_of(model, data["xq"], data["yq"]).backward()
        result = run.compute_influence_all(run.get_log(copy=True), run.build_log_dataloader())
        cols = np.argsort([int(i) for i in result["tgt_ids"]])
        scores = result["influence"].double().numpy()[:, cols]
        assert scores.shape == (len(data["xq"]), len(xt)), scores.shape
        score_s = time.perf_counter() - start
        dims = {name: list(m.weight.shape) for m, name in run.logger.modules_to_name.items()}
        np.save(work / f"scores-{key}.npy", scores)
        return {"log_s": log_s, "score_s": score_s, "rank": 64 if rank is None else rank, "hessian": hessian,
                "modules": dims, "dim": int(sum(np.prod(d) for d in dims.values()))}

    for key, rank, hessian in variants(ranks):
        try:
            out[key] = one(key, rank, hessian)
        except Exception as exc:  # e.g. LogIX's LoRA wrapper inside a peft adapter
            out[key] = {"error": f"{type(exc).__name__}: {exc}"[:300], "rank": 64 if rank is None else rank,
                        "hessian": hessian}
    (work / "child.json").write_text(json.dumps(out, indent=1))


# ---- parent: this repo's env -----------------------------------------------------------------------
def logix_ai_scores(task, model, tmp: Path, site: Path, ranks: list[int]) -> dict:
    """``{key: {"scores": (n_query, n_train) or None, "log_s", "score_s", "dim", "rank", "hessian"}}``
    (``"error"`` where a variant failed) from LogIX in a subprocess."""
    import numpy as np
    import torch

    work = tmp / f"logix-ai-{task.name}"
    work.mkdir(parents=True, exist_ok=True)
    kmodel = task.kron_model(model).eval()
    torch.save(kmodel, work / "model.pt")
    env = dict(zip(task.forward.__code__.co_freevars, (c.cell_contents for c in task.forward.__closure__)))
    causal = "train_tokens" in env  # lm, llama; forward: tokens -> (logits[:, :-1], tokens[:, 1:])
    if causal:
        xt, yt, xq, yq = env["train_tokens"], None, env["query_tokens"], None
    else:  # forward: (model(x[ids]), y[ids]) of the task's tensors
        xt, yt, xq, yq = env["xt"], env["yt"], env["xq"], env["yq"]
    torch.save({"name": task.name, "kind": "lm" if causal else "clf", "xt": xt, "yt": yt, "xq": xq,
                "yq": yq, "modules": task.kron_modules}, work / "data.pt")
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(work), "--rank", *map(str, ranks)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"LogIX's subprocess failed on {task.name}:\n{proc.stderr[-3000:]}")
    info = json.loads((work / "child.json").read_text())
    assert str(site) in info.pop("logix_file"), "the child did not import LogIX"
    return {k: {**v, "scores": None if "error" in v else np.load(work / f"scores-{k}.npy")} for k, v in info.items()}


def logix_ai_rows(task, model, tmp: Path, site: Path, ranks: list[int], masks, outputs, best_full: float) -> list:
    """``bench_suite`` rows (``method`` ``logix-ai``: its defaults; ``logix-ai-KEY``: the other variants);
    a run LogIX cannot do is a row with ``lds`` None and its ``error``."""
    from logix.analysis import lds

    rows = []
    for key, g in logix_ai_scores(task, model, tmp, site, ranks).items():
        row = {"method": "logix-ai" if key == "default" else f"logix-ai-{key}", "preconditioner": g["hessian"],
               "damping": None, "lora_rank": g["rank"], "full_dim": False}
        if g["scores"] is None:
            rows.append({**row, "lds": None, "ratio": None, "bytes_per_example": None, "error": g["error"]})
            print(f"  {row['method']:<20} failed: {g['error'][:100]}", flush=True)
            continue
        value = lds(g["scores"], masks, outputs).mean
        rows.append({**row, "lds": value, "ratio": value / best_full, "bytes_per_example": 4 * g["dim"],
                     "grad_dim": g["dim"], "log_s": g["log_s"], "score_s": g["score_s"]})
        print(f"  {row['method']:<20} {4 * g['dim']:>8} B/ex  LDS {value:.3f} ({value / best_full:.2f})"
              f"  (LoRA rank {g['rank']}, {g['hessian']})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", type=Path, default=Path("/tmp/logixai/site"), help="LogIX 0.1.1's --target install")
    ap.add_argument("--tasks", nargs="+", default=["mlp", "cnn", "text", "lm", "lora", "mlp-relu", "llama"])
    ap.add_argument("--rank", nargs="*", type=int, default=[16], help="LoGra ranks besides the default (64)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="random LoRA draws: seed 0's rows replace the report's; other seeds' LDS is added to "
                    "each row as lds_by_seed (its projections are random, as logix's are)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_suite.json")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rank)
        return

    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from bench_lds import ground_truth
    from suite_holdout import HOLDOUT
    from suite_late import LATE
    from suite_tasks import TASKS

    TASKS = {**TASKS, **HOLDOUT, **LATE}
    torch.set_num_threads(1)
    report = json.loads(args.out.read_text())
    for name in args.tasks:
        t = report["tasks"][name]
        task = TASKS[name]()
        model = task.train(np.ones(task.n_train, dtype=bool), 0)

        def train_out(mask, seed, task=task):
            return task.outputs(task.train(mask, seed))

        masks, outputs, _ = ground_truth(f"suite-{name}", task.recipe, train_out, task.n_train, t["n_subsets"])
        t["rows"] = [r for r in t["rows"] if not r["method"].startswith("logix-ai")]
        by_seed = []
        for seed in range(args.seeds):
            os.environ["SUITE_LOGIX_AI_SEED"] = str(seed)
            with tempfile.TemporaryDirectory() as tmp:
                by_seed.append(logix_ai_rows(task, model, Path(tmp), args.site, args.rank, masks, outputs,
                                             t["best_full_dim"]))
        for i, row in enumerate(by_seed[0]):
            if args.seeds > 1:
                row["lds_by_seed"] = [rows[i]["lds"] for rows in by_seed]
        t["rows"] += by_seed[0]
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

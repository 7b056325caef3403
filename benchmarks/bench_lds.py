"""Attribution quality of logix settings, measured by the linear datamodeling score (LDS).

Two tasks, each with a seeded model trained to (near) convergence from a fixed initialisation:

* ``clf``: ``sklearn.datasets.make_classification`` (20 features, 4 classes), an MLP
  20-64-64-4 (tanh), full-batch Adam with weight decay. Measured output per query: the
  correct-class margin ``z_y - logsumexp_{j != y} z_j`` (= ``log p_y/(1-p_y)``, monotone in
  the negated loss, so its Spearman ranks are those of the negated loss).
* ``lm``: a tiny GPT-2 (2 layers, d=32, vocab 128) on token sequences from four generative
  rules (progressions, repeated motifs, a sparse Markov chain, alternations), each sequence
  starting with its family's marker token. Measured output: the negated summed query loss.

Ground truth (``logix.analysis.retrain_on_subsets``): retrain the same recipe, from the same
initialisation, on random half subsets; cached as ``.npz`` under ``results/cache/`` (the name
carries a hash of the recipe, so a changed recipe never reads stale outputs). For ``clf`` the
same subsets are also retrained from a second initialisation: the Spearman agreement of the
two seeds' outputs ("seed agreement") shows how much of the subset effect is init-specific.

The trained model is logged with logix (train rows from the per-example SUMMED loss, then
queries with ``run.log_queries``) once per curvature and projection: ``statistics.fisher``
``empirical`` (curvature from the data's labels, the default), ``true`` (labels drawn from the
model in the statistics passes, ``fisher_samples`` 1 or 8 draws per example) or ``expected``
(clf only: every class enumerated, weighted by its probability, the exact GGN), times
projection none, random and pca at rank ``k`` per side (capped by each module's dimensions).
Every preconditioner (``raw`` on ``lm`` only when projected: its unprojected blocks are too
large; ``raw-joint``, the whole-row covariance, only where a row has at most 4096 entries) and
relative damping is then scored from the same run with ``load_checkpoint`` +
``compute_influence`` (mode ``dot``) and judged with ``logix.analysis.lds``.

For ``clf`` the reference "exact" influence uses the full Gauss-Newton matrix over all
parameters, ``sum_n J_n^T (diag p_n - p_n p_n^T) J_n`` (autograd Jacobians), with the same
relative damping convention (times its mean eigenvalue) on a wider damping grid; three more
exact variants (per-layer blocks, empirical Fisher) show where the gap between logix and the
reference comes from (see ``exact_scores``).

Uses scikit-learn (``make_classification``) besides logix's own dependencies.

    python benchmarks/bench_lds.py            # full run, ~20 min on 2 cores (ground truth cached)
    python benchmarks/bench_lds.py --quick    # smoke run: few subsets and settings
    # only some settings (the JSON then holds only those):
    python benchmarks/bench_lds.py --tasks clf --fishers expected --projections pca --ranks 32 \
        --pres raw raw-joint --dampings 0.1 1 3 10 --out benchmarks/results/bench_lds-joint.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from sklearn.datasets import make_classification
from torch import nn
from torch.func import functional_call, jacrev, vmap

import logix
from logix.analysis import Damping, compute_influence, lds, load_checkpoint, retrain_on_subsets, spearman
from logix.capture.watch import select_modules
from logix.integrations.losses import expected_class_loss

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = RESULTS / "cache"
# statistics.fisher[:fisher_samples] of the logix runs (expected: clf only)
FISHERS = ("empirical", "true:1", "true:8", "expected")
PRECONDITIONERS = ("identity", "raw", "kfac", "ekfac", "raw-joint")
RAW_MAX_DIM = 8192  # the unprojected clf hidden layer has a 65*64 = 4160-entry block (139 MB float64)
JOINT_MAX_DIM = 4096  # raw-joint only where a logged row has at most this many entries (128 MB float64)
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative: times each module's mean curvature eigenvalue
EXACT_DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 3.0, 10.0, 30.0, 100.0)  # the exact references peak inside

# ---- classification task ----------------------------------------------------------------------
CLF = {"n_train": 600, "n_query": 80, "features": 20, "classes": 4, "hidden": 64, "class_sep": 1.5,
       "steps": 500, "lr": 1e-2, "weight_decay": 1e-2, "seed": 0}


def clf_data() -> tuple[torch.Tensor, ...]:
    """Standardised features and labels: (x_train, y_train, x_query, y_query)."""
    c = CLF
    x, y = make_classification(
        n_samples=c["n_train"] + c["n_query"], n_features=c["features"], n_informative=10, n_redundant=4,
        n_classes=c["classes"], n_clusters_per_class=2, flip_y=0.02, class_sep=c["class_sep"],
        random_state=c["seed"],
    )
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y)
    n = c["n_train"]
    return x[:n], y[:n], x[n:], y[n:]


def clf_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    h = CLF["hidden"]
    return nn.Sequential(nn.Linear(CLF["features"], h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                         nn.Linear(h, CLF["classes"]))


def clf_train(x: torch.Tensor, y: torch.Tensor, mask: np.ndarray, seed: int = 0) -> nn.Module:
    """Full-batch Adam (cosine schedule, L2 weight decay): deterministic given mask and seed."""
    model = clf_model(seed)
    xs, ys = x[torch.from_numpy(mask)], y[torch.from_numpy(mask)]
    opt = torch.optim.Adam(model.parameters(), lr=CLF["lr"], weight_decay=CLF["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, CLF["steps"])
    for _ in range(CLF["steps"]):
        opt.zero_grad()
        F.cross_entropy(model(xs), ys).backward()
        opt.step()
        sched.step()
    return model


def clf_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        z = model(x)
        other = z.scatter(1, y[:, None], -float("inf")).logsumexp(1)
        return (z.gather(1, y[:, None])[:, 0] - other).numpy()


def exact_scores(model: nn.Module, xt, yt, xq, yq, dampings) -> tuple[dict[str, dict], np.ndarray]:
    """Exact influence ``g_q^T (H + d * mean(eig H) I)^-1 g_t`` for each relative damping ``d``.

    ``H`` per variant (``"ggn"`` is the reference; the others locate what logix approximates):

    * ``ggn``           the full Gauss-Newton matrix over all parameters,
                        ``sum_n J_n^T (diag p_n - p_n p_n^T) J_n / n`` (autograd Jacobians);
    * ``ggn-layer``     its per-layer (weight + bias) diagonal blocks, each damped by its own
                        mean eigenvalue, as logix damps per module;
    * ``efisher``       the empirical Fisher ``sum_n g_n g_n^T / n`` of the true-label gradients;
    * ``efisher-layer`` its per-layer blocks: what logix's unprojected ``raw`` preconditioner is.

    Returns ``({variant: {damping: scores}}, g_q^T g_t)``; the plain gradient dot products check
    logix's unprojected rows."""
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    per = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]), in_dims=(None, 0))

    def jac(x):  # {param: (n, classes, numel)} Jacobians of the logits
        return {k: j.flatten(2) for k, j in per(params, x.double()).items()}

    def residual(x, y):  # dloss/dlogits = p - onehot, and p
        with torch.no_grad():
            p = model(x.double()).softmax(1)
        return p - F.one_hot(y, p.shape[1]), p

    jt, jq = jac(xt), jac(xq)
    (rt, p), (rq, _) = residual(xt, yt), residual(xq, yq)
    layers: dict[str, list[str]] = {}
    for name in params:
        layers.setdefault(name.rpartition(".")[0], []).append(name)

    def scores(blocks: list[list[str]], fisher: bool) -> dict[float, np.ndarray]:
        out: dict[float, np.ndarray] = {}
        for block in blocks:
            j_t = torch.cat([jt[k] for k in block], 2)
            g_t = torch.einsum("ncp,nc->np", j_t, rt)
            g_q = torch.einsum("ncp,nc->np", torch.cat([jq[k] for k in block], 2), rq)
            if fisher:
                h = g_t.T @ g_t
            else:  # J^T diag(p) J - (J^T p)(J^T p)^T
                root = (p.sqrt()[:, :, None] * j_t).flatten(0, 1)
                u = torch.einsum("ncp,nc->np", j_t, p)
                h = root.T @ root - u.T @ u
            evals, evecs = torch.linalg.eigh(h / len(xt))
            a, b = g_q @ evecs, g_t @ evecs
            for d in dampings:
                out[d] = out.get(d, 0) + ((a / (evals + d * evals.mean())) @ b.T).numpy()
        return out

    full, per_layer = [list(params)], list(layers.values())
    variants = {"ggn": scores(full, False), "ggn-layer": scores(per_layer, False),
                "efisher": scores(full, True), "efisher-layer": scores(per_layer, True)}
    gt_all = torch.cat([torch.einsum("ncp,nc->np", jt[k], rt) for k in params], 1)
    gq_all = torch.cat([torch.einsum("ncp,nc->np", jq[k], rq) for k in params], 1)
    model.float()
    return variants, (gq_all @ gt_all.T).numpy()


def cached_exact_scores(model, xt, yt, xq, yq, dampings) -> tuple[dict[str, dict], np.ndarray]:
    """:func:`exact_scores`, cached under ``results/cache/`` (minutes on 2 cores; keyed by the
    recipe and the dampings, like the ground truth)."""
    digest = hashlib.sha256(json.dumps([CLF, list(dampings)], sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"clf-exact-{digest}.npz"
    if path.exists():
        data = np.load(path)
        variants: dict[str, dict] = {}
        for key in data.files:
            if key != "dots":
                variant, _, d = key.partition("@")
                variants.setdefault(variant, {})[float(d)] = data[key]
        return variants, data["dots"]
    variants, dots = exact_scores(model, xt, yt, xq, yq, dampings)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, dots=dots, **{f"{v}@{d!r}": s for v, by_d in variants.items() for d, s in by_d.items()})
    return variants, dots


# ---- language-model task -----------------------------------------------------------------------
LM = {"n_train": 320, "n_query": 64, "vocab": 128, "seq": 20, "families": 4, "n_embd": 32, "n_layer": 2,
      "n_head": 2, "epochs": 30, "batch": 32, "lr": 3e-3, "weight_decay": 0.0, "seed": 0}


def lm_data(seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """``(train_tokens, query_tokens, query_family)``; family ``f`` sequences start with token f
    (``seed``: the generator's, ``LM["seed"]`` by default)."""
    rng = np.random.default_rng(LM["seed"] if seed is None else seed)
    lo, vocab, seq = LM["families"], LM["vocab"], LM["seq"]
    n_content = vocab - lo
    succ = rng.integers(0, n_content, size=(n_content, 2))  # sparse Markov chain: 2 successors each

    def sample(family: int) -> list[int]:
        n = seq - 1
        if family == 0:  # arithmetic progression with step 1..3
            a, d = rng.integers(n_content), rng.integers(1, 4)
            body = [(a + i * d) % n_content for i in range(n)]
        elif family == 1:  # a random motif of length 3, repeated
            motif = rng.integers(0, n_content, 3)
            body = [int(motif[i % 3]) for i in range(n)]
        elif family == 2:  # Markov chain
            body = [int(rng.integers(n_content))]
            while len(body) < n:
                body.append(int(succ[body[-1], rng.integers(2)]))
        else:  # two tokens alternating, then a third
            a, b = rng.integers(0, n_content, 2)
            body = [int(a) if i % 2 == 0 else int(b) for i in range(n)]
        return [family] + [lo + int(t) for t in body]

    total = LM["n_train"] + LM["n_query"]
    families = np.arange(total) % LM["families"]
    rng.shuffle(families)
    tokens = torch.tensor([sample(int(f)) for f in families])
    n = LM["n_train"]
    return tokens[:n], tokens[n:], families[n:]


def lm_model(seed: int) -> nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=LM["n_layer"], n_embd=LM["n_embd"], n_head=LM["n_head"], vocab_size=LM["vocab"],
        n_positions=LM["seq"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()  # no dropout: deterministic


def sampled(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One class per row of ``logits`` drawn from the model's softmax (true-Fisher passes)."""
    return torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)[:, 0]


def lm_loss(model: nn.Module, tokens: torch.Tensor, reduction: str = "sum",
            gen: torch.Generator | None = None) -> torch.Tensor:
    """Next-token loss; ``sum`` over tokens and examples, ``none`` -> per-example sums.
    With ``gen``, the targets are drawn from the model instead (a true-Fisher pass)."""
    if isinstance(gen, dict):  # Pass.loss_kwargs of a statistics pass
        gen = gen.get("generator")
    logits = model(input_ids=tokens).logits[:, :-1].reshape(-1, LM["vocab"])
    target = tokens[:, 1:].reshape(-1) if gen is None else sampled(logits, gen)
    loss = F.cross_entropy(logits, target, reduction="none")
    loss = loss.view(tokens.shape[0], -1).sum(1)
    return loss if reduction == "none" else loss.sum()


def lm_train(tokens: torch.Tensor, mask: np.ndarray, seed: int = 0) -> nn.Module:
    """Minibatch Adam on the mean token loss; the batch order is seeded, so runs are deterministic."""
    model = lm_model(seed)
    data = tokens[torch.from_numpy(mask)]
    opt = torch.optim.AdamW(model.parameters(), lr=LM["lr"], weight_decay=LM["weight_decay"])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(LM["epochs"]):
        for idx in torch.randperm(len(data), generator=gen).split(LM["batch"]):
            opt.zero_grad()
            (lm_loss(model, data[idx]) / (len(idx) * (LM["seq"] - 1))).backward()
            opt.step()
    return model


def lm_outputs(model: nn.Module, queries: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return -lm_loss(model, queries, "none").numpy()


# ---- logging and scoring -----------------------------------------------------------------------
def ranks_for(model: nn.Module, k: int) -> dict[str, list[int]]:
    """Per-module ranks ``[min(k, d_in+bias), min(k, d_out)]`` (PCA cannot exceed the dims)."""
    return {w.name: [min(k, w.shape.d_in_aug), min(k, w.shape.d_out)] for w in select_modules(model)}


def row_dim(model: nn.Module, k: int | None) -> int:
    """Entries of a logged row at rank ``k`` per side (``None``: unprojected)."""
    return sum(min(k or 10**9, w.shape.d_in_aug) * min(k or 10**9, w.shape.d_out) for w in select_modules(model))


def log_run(root: Path, name: str, model: nn.Module, loss_fn, n_train: int, n_query: int,
            projection: str, k: int | None, raw: bool, fisher: str, batch: int = 64, raw_joint: bool = False,
            classes: int = 0, ranks: dict | None = None, store_dtype: str = "float32", seed: int = 0) -> Path:
    """Log train rows (every pass of the plan), then queries; returns the run directory.

    ``loss_fn(ids, query, labels)`` returns the summed loss of those train (or query) examples;
    ``labels`` is ``{}`` (the data's labels) or the pass's ``Pass.loss_kwargs``: labels drawn by
    ``generator`` from the model, or class ``label_class`` weighted by ``sqrt(C p)``.
    ``fisher``: ``empirical``, ``true:<label draws per example>`` or ``expected`` (``classes``).
    ``store_dtype``: the train store's dtype (``int8`` / ``int4``: quantized); ``seed``: the projection's.
    """
    proj = {"type": projection, "seed": seed}
    if k is not None or ranks is not None:  # ranks: {module: [k_in, k_out]}, overrides k
        proj["ranks"] = ranks if ranks is not None else ranks_for(model, k)
    kind, _, samples = fisher.partition(":")
    stats = {"kfac": True, "ekfac": True, "raw": raw, "raw_joint": raw_joint, "raw_max_dim": RAW_MAX_DIM,
             "fisher": kind, "fisher_samples": int(samples or 1), "fisher_classes": classes}
    return log_config(root, name, model, loss_fn, n_train, n_query,
                      {"projection": proj, "statistics": stats, "store": {"dtype": store_dtype}}, batch)


def log_config(root: Path, name: str, model: nn.Module, loss_fn, n_train: int, n_query: int, config: dict,
               batch: int = 64) -> Path:
    """:func:`log_run` with any ``logix.init`` config (``{}``: every default)."""
    run = logix.init(name, config=config, root=root, overwrite=True)
    run.watch(model)
    gen = torch.Generator().manual_seed(0)
    for pass_ in run.plan():
        for r in range(pass_.repeats):
            for lo in range(0, n_train, batch):
                ids = list(range(lo, min(lo + batch, n_train)))
                model.zero_grad(set_to_none=True)
                with run(data_id=ids):
                    loss_fn(ids, False, pass_.loss_kwargs(r, gen)).backward()
    run.finalize()
    for lo in range(0, n_query, batch):
        ids = list(range(lo, min(lo + batch, n_query)))
        with run.log_queries(data_id=ids):
            loss_fn(ids, True, {}).backward()
    run.finalize()
    model.zero_grad(set_to_none=True)
    return run.dir


def score_matrix(run_dir: Path, preconditioner: str, damping: float | None, tmp: Path) -> np.ndarray:
    """The full (n_query, n_train) score matrix, through the streaming scorer and its HDF5 output
    (``damping`` relative; None: the preconditioner's default)."""
    cp = load_checkpoint(run_dir, preconditioner, None if damping is None else Damping(damping))
    assert cp.train.ids == list(range(cp.train.n_rows)), "train rows out of order"
    path = tmp / "scores.h5"
    compute_influence(cp, top_k=1, scores_path=path, self_influence=False, progress=False)
    with h5py.File(path) as fh:
        return fh["scores"][()]


def sweep(task: str, model, loss_fn, n_train: int, n_query: int, masks, outputs, projections,
          preconditioners, dampings, raw_unprojected: bool, fishers, tmp: Path, classes: int = 0) -> list[dict]:
    """LDS of every (curvature, projection, k, preconditioner, damping) setting on one trained
    model. The identity preconditioner uses no curvature: scored for the first ``fishers`` only.
    ``raw`` needs a dense covariance per logged block: skipped unprojected unless ``raw_unprojected``;
    ``raw-joint`` one of the whole row: skipped where a row has more than ``JOINT_MAX_DIM`` entries."""
    rows = []
    for fisher in fishers:
        for projection, k in projections:
            t0 = start = time.perf_counter()
            raw = "raw" in preconditioners and (k is not None or raw_unprojected)
            joint = "raw-joint" in preconditioners and row_dim(model, k) <= JOINT_MAX_DIM
            run_dir = log_run(tmp, f"{task}-{fisher.replace(':', '')}-{projection}-{k}", model, loss_fn, n_train,
                              n_query, projection, k, raw, fisher, raw_joint=joint, classes=classes)
            log_s = time.perf_counter() - start
            store = logix.load_run_store(run_dir)
            per_example = store.nbytes() // store.n_rows
            for pre in preconditioners:
                if (pre == "identity" and fisher != fishers[0]) or (pre == "raw" and not raw) or (
                        pre == "raw-joint" and not joint):
                    continue
                for damping in (None,) if pre == "identity" else dampings:
                    start = time.perf_counter()
                    scores = score_matrix(run_dir, pre, damping or 0.0, tmp)
                    result = lds(scores, masks, outputs)
                    rows.append({"task": task, "fisher": "-" if pre == "identity" else fisher,
                                 "projection": projection, "k": k, "preconditioner": pre, "damping": damping,
                                 "lds": result.mean, "lds_std": float(np.nanstd(result.per_query)),
                                 "bytes_per_example": per_example, "log_s": log_s,
                                 "score_s": time.perf_counter() - start})
            print(f"  {task} {fisher:<9} {projection:<6} k={k!s:<4} logged in {log_s:5.1f}s, logged+scored in "
                  f"{time.perf_counter() - t0:5.1f}s", flush=True)
    return rows


def cache_path(task: str, recipe: dict, n_subsets: int, seed: int) -> Path:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    return CACHE / f"{task}-{digest}-s{n_subsets}-init{seed}.npz"


def ground_truth(task: str, recipe: dict, train_out, n_train: int, n_subsets: int, seed: int = 0):
    """(masks, outputs, seconds) of retraining ``train_out(mask, seed)`` on half subsets (cached)."""
    start = time.perf_counter()
    masks, outputs = retrain_on_subsets(lambda m: train_out(m, seed), n_train, n_subsets,
                                        cache=cache_path(task, recipe, n_subsets, seed),
                                        progress=sys.stderr.isatty())
    return masks, outputs, time.perf_counter() - start


# ---- the two tasks -----------------------------------------------------------------------------
def run_clf(args, tmp: Path) -> dict:
    xt, yt, xq, yq = clf_data()
    n, nq = len(xt), len(xq)
    model = clf_train(xt, yt, np.ones(n, dtype=bool))
    with torch.no_grad():
        acc = float((model(xq).argmax(1) == yq).float().mean())
    print(f"clf: MLP query accuracy {acc:.3f}; retraining on {args.clf_subsets} subsets", flush=True)

    def train_out(mask, seed):
        return clf_margin(clf_train(xt, yt, mask, seed), xq, yq)

    masks, outputs, gt_s = ground_truth("clf", CLF, train_out, n, args.clf_subsets)
    _, outputs_b, _ = ground_truth("clf", CLF, train_out, n, args.clf_subsets, seed=1)
    agreement = float(np.nanmean(spearman(outputs, outputs_b)))

    x_all, y_all = torch.cat([xt, xq]), torch.cat([yt, yq])

    def loss_fn(ids, query, labels):
        idx = torch.tensor(ids) + (n if query else 0)
        logits = model(x_all[idx])
        if "label_class" in labels:  # fisher: expected
            return expected_class_loss(logits, y_all[idx], labels["label_class"], labels["num_classes"])
        target = sampled(logits, labels["generator"]) if labels else y_all[idx]
        return F.cross_entropy(logits, target, reduction="sum")

    exact, dots = cached_exact_scores(model, xt, yt, xq, yq, args.exact_dampings)
    exact_rows = {v: [{"damping": d, "lds": lds(s, masks, outputs).mean} for d, s in by_d.items()]
                  for v, by_d in exact.items()}
    projections = [(p, k) for p in args.projections for k in ((None,) if p == "none" else args.ranks)]
    rows = sweep("clf", model, loss_fn, n, nq, masks, outputs, projections, args.pres, args.dampings, True,
                 args.fishers, tmp, classes=CLF["classes"])
    check = float("nan")
    if "none" in args.projections and "identity" in args.pres:
        full = score_matrix(tmp / f"clf-{args.fishers[0].replace(':', '')}-none-None", "identity", 0.0, tmp)
        check = float(np.linalg.norm(full - dots) / np.linalg.norm(dots))
    return {"setup": {**CLF, "n_subsets": args.clf_subsets, "query_accuracy": acc},
            "ground_truth_s": gt_s, "seed_agreement": agreement, "identity_vs_autograd_rel_err": check,
            "exact_ggn": exact_rows.pop("ggn"), "exact_variants": exact_rows, "rows": rows}


def run_lm(args, tmp: Path) -> dict:
    train, queries, families = lm_data()
    n, nq = len(train), len(queries)
    model = lm_train(train, np.ones(n, dtype=bool))
    print(f"lm: GPT-2 mean query loss/token {-lm_outputs(model, queries).mean() / (LM['seq'] - 1):.3f}; "
          f"retraining on {args.lm_subsets} subsets", flush=True)
    masks, outputs, gt_s = ground_truth("lm", LM, lambda m, s: lm_outputs(lm_train(train, m, s), queries),
                                        n, args.lm_subsets)

    def loss_fn(ids, query, labels):
        return lm_loss(model, (queries if query else train)[ids], gen=labels or None)

    fishers = [f for f in args.fishers if f != "expected"]  # one label per example only: not a LM
    projections = [(p, k) for p in args.projections for k in ((None,) if p == "none" else args.lm_ranks)]
    rows = sweep("lm", model, loss_fn, n, nq, masks, outputs, projections, args.pres, args.dampings, False,
                 fishers, tmp)
    return {"setup": {**LM, "n_subsets": args.lm_subsets}, "ground_truth_s": gt_s, "rows": rows}


# ---- report ------------------------------------------------------------------------------------
def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n{name}\n{'fisher':<9} {'projection':<10} {'k':>4} {'precond':<8} {'damping':>8} {'LDS':>7} "
          f"{'bytes/ex':>9}")
    for r in rows:
        damping = "-" if r["damping"] is None else f"{r['damping']:g}"
        print(f"{r['fisher']:<9} {r['projection']:<10} {r['k'] or '-':>4} {r['preconditioner']:<8} {damping:>8} "
              f"{r['lds']:>7.3f} {r['bytes_per_example']:>9}")


def best(rows: list[dict], max_k: int | None = None, **match) -> dict | None:
    """The projected setting with the highest LDS (``k <= max_k``; fields equal to ``match``)."""
    pool = [r for r in rows if r["projection"] != "none" and (max_k is None or r["k"] <= max_k)
            and all(r[key] == value for key, value in match.items())]
    return max(pool, key=lambda r: r["lds"]) if pool else None


def damping_summary(tasks: dict, fishers, dampings, max_k: int = 32) -> dict:
    """Per curvature and damping: each task's best projected LDS (k <= max_k) and their mean."""
    out: dict = {}
    for fisher in fishers:
        for d in dampings:
            per_task = {name: b["lds"] for name, t in tasks.items()
                        if (b := best(t["rows"], max_k, fisher=fisher, damping=d)) is not None}
            if not per_task:
                continue
            out.setdefault(fisher, {})[f"{d:g}"] = {**per_task, "mean": float(np.mean(list(per_task.values())))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few subsets, ranks and dampings")
    ap.add_argument("--tasks", nargs="+", default=["clf", "lm"], choices=["clf", "lm"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--fishers", nargs="+", help=f"curvatures (default {' '.join(FISHERS)}; also expected)")
    ap.add_argument("--projections", nargs="+", default=["none", "random", "pca"], choices=["none", "random", "pca"])
    ap.add_argument("--ranks", nargs="+", type=int, help="clf ranks k per side (default 4 8 16 32)")
    ap.add_argument("--lm-ranks", nargs="+", type=int, help="lm ranks k per side (default 8 32)")
    ap.add_argument("--pres", nargs="+", default=list(PRECONDITIONERS), choices=PRECONDITIONERS,
                    help="preconditioners to score")
    ap.add_argument("--dampings", nargs="+", type=float, help="relative dampings (default 0.001 ... 10)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_lds.json", help="JSON results path")
    args = ap.parse_args()
    args.clf_subsets, args.lm_subsets = (20, 10) if args.quick else (100, 64)
    args.ranks = args.ranks or ([8] if args.quick else [4, 8, 16, 32])
    args.lm_ranks = args.lm_ranks or ([8] if args.quick else [8, 32])
    args.dampings = tuple(args.dampings or ((0.1, 1.0) if args.quick else DAMPINGS))
    args.exact_dampings = (0.1, 1.0, 10.0) if args.quick else EXACT_DAMPINGS
    args.fishers = args.fishers or (["empirical", "true:1"] if args.quick else list(FISHERS))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tasks = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "clf" in args.tasks:
            tasks["clf"] = run_clf(args, Path(tmp))
        if "lm" in args.tasks:
            tasks["lm"] = run_lm(args, Path(tmp))
    for name, t in tasks.items():
        print_table(f"== {name}: LDS over {t['setup']['n_subsets']} half-subset retrainings ==", t["rows"])
        b = best(t["rows"], 32)
        t["best_projected"] = b
        t["best_projected_by_fisher"] = {f: r for f in args.fishers if (r := best(t["rows"], 32, fisher=f))}
        for f, r in t["best_projected_by_fisher"].items():
            print(f"best projected (k <= 32), fisher {f:<9}: {r['projection']} k={r['k']} {r['preconditioner']} "
                  f"damping={r['damping']}: LDS {r['lds']:.3f}")
        if "exact_ggn" in t and b is not None:
            ex = max(t["exact_ggn"], key=lambda r: r["lds"])
            t["best_exact"] = ex
            for variant, exact_rows in {"ggn": t["exact_ggn"], **t["exact_variants"]}.items():
                print(f"exact {variant:<13}: " + ", ".join(f"d={r['damping']:g}: {r['lds']:.3f}" for r in exact_rows))
            print(f"best projected - best exact = {b['lds'] - ex['lds']:+.3f}; seed agreement "
                  f"{t['seed_agreement']:.3f}; logix identity vs autograd rel err "
                  f"{t['identity_vs_autograd_rel_err']:.1e}")
    summary = damping_summary(tasks, args.fishers, args.dampings)
    print(f"\nbest projected LDS (k <= 32) per curvature and damping\n{'fisher':<9} {'damping':>8} "
          + "".join(f"{name:>7}" for name in tasks) + f"{'mean':>7}")
    for fisher, by_damping in summary.items():
        for d, vals in by_damping.items():
            print(f"{fisher:<9} {d:>8} " + "".join(f"{vals[t]:>7.3f}" if t in vals else f"{'-':>7}" for t in tasks)
                  + f"{vals['mean']:>7.3f}")
    report = {"tasks": tasks, "damping_summary": summary, "quick": args.quick,
              "wall_s": time.perf_counter() - start, "torch": torch.__version__,
              "transformers": transformers.__version__, "threads": torch.get_num_threads(),
              "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwall {report['wall_s']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()

"""Throughput and peak memory of logix capture versus per-example-gradient baselines.

Model: a seeded tiny GPT-2 (4 layers, d=256, vocab 5000, seq 128), float32 on CPU, random
tokens, batch 8, right padding on every other example (``attention_mask``; labels -100 on
padding). Each example's loss is the SUM of its shifted next-token losses. Methods:

* ``plain``    forward + backward, no logix (the reference);
* ``logix-k``  the same inside ``with run(...)``: random projection k x k per module, KFAC
               statistics on, rows written to the store (``finalize`` timed, amortised);
* ``loop-k``   one backward per example (batch of 1), then ``P_out^T G P_in`` (or a dense
               ``vec(G) @ P`` when all its matrices fit ``--dense-mb``) of each captured
               module's materialised gradient ``G``;
* ``vmap-k``   ``torch.func`` per-sample gradients (``vmap(grad(functional_call))``) + the
               same projection;
* ``loopdense-k`` the loop with the dense ``vec(G) @ P`` projection of the flattened gradient
               whatever its size (the textbook baseline: P is 5.6 GB at k=16 for this model), run
               only where P fits in half the available memory, with ``--dense-iters`` batches.

Each method runs in its own subprocess (``--method``): first alone (warm-up, then ``--iters``
timed batches; ``ru_maxrss`` gives its own peak RSS), then ``--pairs`` batches alternating
with plain batches in the same process. Throughput is ``batch / median batch time``; "vs
plain" is the paired ratio, which cancels the slow drift in speed of a shared machine.
``--rounds`` repeats everything, interleaved; the JSON keeps every round, and the table shows
each method's fastest standalone round and the mean paired ratio. ``background_cpu`` is the
share of the machine's CPU that other processes used while a method was timed.

Baselines project the modules ``run.watch`` picks with logix's own random matrices, so their
rows equal logix's, except that GPT-2 ties ``lm_head`` to ``wte``: for that pair they project
the shared parameter's summed gradient (same cost, not the same numbers).

    python benchmarks/bench_capture.py            # full run (~6 min on 2 cores, 12 GB free for loopdense-16)
    python benchmarks/bench_capture.py --quick    # smoke run (< 1 min)
    python benchmarks/bench_capture.py --methods logix --rounds 4   # plain vs logix-16/32 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median

import torch
import torch.nn.functional as F
import transformers
from torch.func import functional_call, grad, vmap

import logix
from logix.capture.watch import select_modules
from logix.core.projection import random_projection

BATCH, SEQ, VOCAB = 8, 128, 5000
KINDS = ("logix", "loop", "vmap", "loopdense")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_capture.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; Linux."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def logix_version() -> str:
    """The git commit of the logix being measured, ``+dirty`` when its sources differ from it."""
    root = Path(logix.__file__).resolve().parent
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def dense_fits(k: int) -> bool:
    """Whether the dense k*k projection matrices of every watched module fit in half of MemAvailable."""
    numel = sum(w.shape.d_out * w.shape.d_in_aug for w in select_modules(build_model()))
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return numel * k * k * 4 <= available / 2


def build_model() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    n_embd = int(os.environ.get("LOGIX_BENCH_N_EMBD", "256"))  # --n-embd: the width sweep
    cfg = transformers.GPT2Config(n_layer=4, n_embd=n_embd, n_head=4, vocab_size=VOCAB, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(cfg).to(torch.float32).eval()  # eval: no dropout


def make_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for b in range(1, BATCH, 2):  # every other example is right-padded to a random length
        mask[b, int(torch.randint(SEQ // 4, SEQ, (1,), generator=gen)) :] = 0
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    data_id = torch.arange(step * BATCH, (step + 1) * BATCH)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "data_id": data_id}


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted LM loss summed over tokens and examples (the per-example loss is a sum)."""
    logits, labels = logits[..., :-1, :].flatten(0, -2), labels[..., 1:].flatten()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


class Projector:
    """Projects each watched module's canonical ``(d_out, d_in+bias)`` gradient to k*k numbers."""

    def __init__(self, model: torch.nn.Module, k: int, dense_mb: float) -> None:
        self.watched = select_modules(model)
        self.mats = {
            w.name: (
                random_projection(w.name, w.shape.d_in_aug, k, 0, "in"),
                random_projection(w.name, w.shape.d_out, k, 0, "out"),
            )
            for w in self.watched
        }
        numel = sum(w.shape.d_out * w.shape.d_in_aug for w in self.watched)
        self.dense_mb = numel * k * k * 4 / 2**20
        self.form = "dense" if self.dense_mb <= dense_mb else "factored"
        if self.form == "dense":
            self.mats = {
                w.name: torch.randn(w.shape.d_out * w.shape.d_in_aug, k * k) / k for w in self.watched
            }
        names = {id(p): n for n, p in model.named_parameters()}  # dedupes the tied lm_head/wte
        self.params = {w.name: [names[id(p)] for p in w.adapter.weights(w.module)] for w in self.watched}

    def one(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """One example's projected gradients, concatenated like a logix row."""
        out = []
        for w in self.watched:
            g = w.adapter.param_grad_to_canonical(w.module, [grads[n] for n in self.params[w.name]])
            if self.form == "dense":
                out.append(g.reshape(-1) @ self.mats[w.name])
            else:
                p_in, p_out = self.mats[w.name]
                out.append((p_out.T @ g @ p_in).reshape(-1))
        return torch.cat(out)


def timed(fn, step: int) -> float:
    start = time.perf_counter()
    fn(step)
    return time.perf_counter() - start


def run_method(method: str, warmup: int, iters: int, pairs: int, dense_mb: float) -> dict:
    """Measure one method in this process (see the module docstring)."""
    model = build_model()
    n = warmup + iters
    batches = [make_batch(s) for s in range(n + pairs)]
    kind, _, k = method.partition("-")
    k, extra = int(k or 0), {}
    if kind == "loopdense":
        kind, dense_mb = "loop", float("inf")
    tmp = tempfile.TemporaryDirectory()

    def forward_backward(b: dict) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        summed_loss(logits, b["labels"]).backward()

    def plain(s: int) -> None:
        forward_backward(batches[s])

    step = plain
    if kind == "logix":
        config = {"projection": {"type": "random", "rank_in": k, "rank_out": k}, "statistics": {"kfac": True}}
        runs = [logix.init(f"bench{i}", config=config, root=tmp.name) for i in range(2)]  # alone, paired
        for r in runs:
            extra["modules"] = len(r.watch(model))

        def step(s: int) -> None:
            with runs[s >= n](data_id=batches[s]["data_id"], mask=batches[s]["attention_mask"]):
                forward_backward(batches[s])

    elif kind in ("loop", "vmap"):
        proj = Projector(model, k, dense_mb)
        extra.update(projection_form=proj.form, dense_matrices_mb=round(proj.dense_mb, 1))
        rows: list[torch.Tensor] = []
        params = {n: p.detach() for n, p in model.named_parameters()}
        causal = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))

        def example_loss(p, ids, mask4, labels):
            logits = functional_call(model, p, (ids[None],), {"attention_mask": mask4[None]}).logits
            return summed_loss(logits, labels[None])

        per_sample = vmap(grad(example_loss), in_dims=(None, 0, 0, 0))

        def step(s: int) -> None:
            b = batches[s]
            if kind == "loop":
                for i in range(BATCH):
                    forward_backward({key: v[i : i + 1] for key, v in b.items()})
                    rows.append(proj.one({n: p.grad for n, p in model.named_parameters()}))
            else:  # a ready 4D mask: transformers' 2D-mask preprocessing branches on data (no vmap)
                mask4 = causal[None, None] & b["attention_mask"].bool()[:, None, None, :]
                rows.append(vmap(proj.one)(per_sample(params, b["input_ids"], mask4, b["labels"])))

    elif kind != "plain":
        raise SystemExit(f"unknown method {method!r}")

    setup_rss = peak_rss_mb()
    for s in range(warmup):
        step(s)
    busy0, own0 = cpu_seconds()
    times = [timed(step, s) for s in range(warmup, n)]
    busy1, own1 = cpu_seconds()
    per_example_extra = 0.0
    if kind == "logix":
        start = time.perf_counter()
        store = runs[0].finalize()
        extra["finalize_s"] = time.perf_counter() - start
        extra["rows"], extra["row_dim"] = store.n_rows, store.dim
        per_example_extra = extra["finalize_s"] / (iters * BATCH)  # amortised over the timed examples
    peak = peak_rss_mb()
    paired = 1.0
    if kind != "plain" and pairs:
        t_plain, t_method = [], []
        for s in range(n, n + pairs):
            t_plain.append(timed(plain, s))
            t_method.append(timed(step, s))
        paired = (median(t_plain) / BATCH) / (median(t_method) / BATCH + per_example_extra)
        extra["paired_batch_s_median"] = {"plain": median(t_plain), "method": median(t_method)}
    if kind == "logix":
        runs[1].close()
    tmp.cleanup()
    return {
        "method": method,
        "examples_per_s": 1 / (median(times) / BATCH + per_example_extra),
        "vs_plain_paired": paired,
        "batch_s_median": median(times),
        "batch_s_min": min(times),
        "peak_rss_mb": peak,
        "setup_rss_mb": setup_rss,
        "peak_rss_delta_mb": peak - setup_rss,
        "background_cpu": max(0.0, (busy1 - busy0) - (own1 - own0)) / (sum(times) * os.cpu_count()),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few iterations, k=16 only")
    ap.add_argument("--iters", type=int, help="timed batches per method alone (default 10, quick 2)")
    ap.add_argument("--pairs", type=int, help="timed (plain, method) batch pairs (default 10, quick 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--rounds", type=int, help="subprocess runs per method (default 2, quick 1)")
    ap.add_argument("--ranks", type=int, nargs="+", help="k per side (default 16 32, quick 16)")
    ap.add_argument("--methods", nargs="+", choices=KINDS, default=list(KINDS),
                    help="method kinds to run besides plain (default: all)")
    ap.add_argument("--dense-mb", type=float, default=1024, help="dense baseline projection if it fits")
    ap.add_argument("--dense-iters", type=int, default=3, help="timed batches and pairs of loopdense-k")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    ap.add_argument("--n-embd", type=int, default=256,
                    help="model width (the benchmark of record: 256)")
    ap.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = ap.parse_args()
    os.environ["LOGIX_BENCH_N_EMBD"] = str(args.n_embd)  # subprocesses build the same model
    iters = args.iters or (2 if args.quick else 10)
    pairs = args.pairs if args.pairs is not None else (2 if args.quick else 10)
    rounds = args.rounds or (1 if args.quick else 2)
    ranks = args.ranks or ([16] if args.quick else [16, 32])
    if args.method:
        print(json.dumps(run_method(args.method, args.warmup, iters, pairs, args.dense_mb)))
        return

    methods = ["plain"] + [f"{kind}-{k}" for k in ranks for kind in ("logix", "loop", "vmap") if kind in args.methods]
    if not args.quick and "loopdense" in args.methods:
        methods += [f"loopdense-{k}" for k in ranks if dense_fits(k)]
    common = ["--warmup", str(args.warmup), "--dense-mb", str(args.dense_mb)]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    load_before, start = os.getloadavg(), time.perf_counter()
    for r in range(rounds):  # rounds interleave methods; the order rotates
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            n_it, n_pairs = (args.dense_iters,) * 2 if m.startswith("loopdense") else (iters, pairs)
            cmd = [sys.executable, __file__, "--method", m, "--iters", str(n_it), "--pairs", str(n_pairs), *common]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{m} failed:\n{proc.stderr}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[m].append(res)
            print(
                f"  round {r + 1}/{rounds} {m:<12} {res['examples_per_s']:6.2f} ex/s, "
                f"{res['vs_plain_paired']:.3f} x plain, bg CPU {res['background_cpu']:.0%}",
                flush=True,
            )
    results = {}
    for m, rs in runs.items():
        best = max(rs, key=lambda x: x["examples_per_s"])
        results[m] = {
            "examples_per_s": best["examples_per_s"],  # fastest standalone round
            "vs_plain_paired": mean(x["vs_plain_paired"] for x in rs),
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "peak_rss_delta_mb": max(x["peak_rss_delta_mb"] for x in rs),
            "background_cpu": best["background_cpu"],
            "projection_form": best.get("projection_form"),
            "rounds": rs,
        }
    base = results["plain"]["examples_per_s"]
    ratios, standalone = {}, {}
    for k in ranks:
        if f"logix-{k}" not in results:
            continue
        lx = results[f"logix-{k}"]
        for other in ("plain", f"loop-{k}", f"vmap-{k}", f"loopdense-{k}"):
            if other not in results:
                continue
            ratios[f"logix-{k}/{other}"] = lx["vs_plain_paired"] / results[other]["vs_plain_paired"]
            standalone[f"logix-{k}/{other}"] = lx["examples_per_s"] / results[other]["examples_per_s"]

    print(
        f"\n{'method':<12} {'examples/s':>10} {'vs plain':>9} {'standalone':>10} {'peak RSS MB':>11} ", end=""
    )
    print(f"{'delta MB':>8} {'bg CPU':>6}  projection")
    for m, r in results.items():
        print(
            f"{m:<12} {r['examples_per_s']:>10.2f} {r['vs_plain_paired']:>9.3f} "
            f"{r['examples_per_s'] / base:>10.3f} {r['peak_rss_mb']:>11.0f} {r['peak_rss_delta_mb']:>8.0f} "
            f"{r['background_cpu']:>6.0%}  {r['projection_form'] or ''}"
        )
    print("\nratios (paired; standalone in brackets):")
    for name, value in ratios.items():
        print(f"  {name:<24} {value:6.3f}  ({standalone[name]:.3f})")

    setup = {
        "model": f"GPT-2 n_layer=4 n_embd={os.environ.get('LOGIX_BENCH_N_EMBD', '256')} n_head=4 vocab=5000, float32, eval mode",
        "batch": BATCH,
        "seq_len": SEQ,
        "warmup": args.warmup,
        "iters": iters,
        "pairs": pairs,
        "dense_iters": args.dense_iters,
        "rounds": rounds,
        "ranks": ranks,
        "quick": args.quick,
        "methods": methods,
        "logix": f"{logix.__version__} {logix_version()} ({Path(logix.__file__).parent})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "rss": "ru_maxrss of each method's own subprocess, before its paired phase",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_s": time.perf_counter() - start,
    }
    report = {"setup": setup, "results": results, "ratios_paired": ratios, "ratios_standalone": standalone}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

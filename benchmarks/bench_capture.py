"""Throughput and peak memory of logix capture versus per-example-gradient baselines.

Model: a seeded tiny GPT-2 (4 layers, d=256, vocab 5000, seq 128), float32 on CPU, random
tokens, batch 8, right padding on every other example (``attention_mask``; labels -100 on
padding). Each example's loss is the SUM of its shifted next-token losses. Methods:

* ``plain``      forward + backward, no logix (the reference);
* ``logix-k``    the same inside ``with run(...)``: random projection k x k per module, KFAC
                 statistics on, rows written to the store (``finalize`` is timed too);
* ``loop-k``     one backward per example (batch of 1), then ``P_out^T G P_in`` (or a dense
                 ``vec(G) @ P`` when the matrices fit ``--dense-mb``) of each captured module's
                 materialised gradient ``G``;
* ``vmap-k``     ``torch.func`` per-sample gradients (``vmap(grad(functional_call))``) + the
                 same projection.

Every method runs in its own subprocess (``--method``), so the peak RSS (``ru_maxrss``) it
reports is its own. Throughput is ``batch / median batch time`` (plus logix's ``finalize``
amortised over the examples); ``--rounds`` repeats every method, interleaved, and keeps its
fastest round, which damps other load on a shared machine (all rounds are in the JSON;
``background_cpu`` is the share of the machine's CPU other processes used while timing).

Baselines project the modules ``run.watch`` picks with logix's own random matrices, so their
rows equal logix's, except that GPT-2 ties ``lm_head`` to ``wte``: for that pair they project
the shared parameter's summed gradient (same cost, not the same numbers).

    python benchmarks/bench_capture.py            # full run (< 6 min on 2 cores)
    python benchmarks/bench_capture.py --quick    # smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.func import functional_call, grad, vmap

import logix
from logix.capture.watch import select_modules
from logix.projection import random_projection

BATCH, SEQ, VOCAB = 8, 128, 5000
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_capture.json"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_model() -> torch.nn.Module:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=VOCAB, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(cfg).to(torch.float32).eval()  # eval: no dropout


def make_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for b in range(1, BATCH, 2):  # every other example is right-padded to a random length
        mask[b, int(torch.randint(SEQ // 4, SEQ, (1,), generator=gen)) :] = 0
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).masked_fill(mask == 0, 0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, -100),
        "data_id": torch.arange(step * BATCH, (step + 1) * BATCH),
    }


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted LM loss summed over tokens and examples (the per-example loss is a sum)."""
    return F.cross_entropy(
        logits[..., :-1, :].flatten(0, -2), labels[..., 1:].flatten(), ignore_index=-100, reduction="sum"
    )


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


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far; Linux."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime


def bench(step_fn, warmup: int, iters: int) -> tuple[list[float], float, float]:
    """Run ``step_fn(step)`` ``warmup`` then ``iters`` times.

    Returns the timed step seconds, the peak RSS before the first step, and the share of the
    machine's CPU that other processes used meanwhile (background load that slows the timing).
    """
    setup_rss = peak_rss_mb()
    for s in range(warmup):
        step_fn(s)
    times = []
    busy0, own0 = cpu_seconds()
    for s in range(warmup, warmup + iters):
        start = time.perf_counter()
        step_fn(s)
        times.append(time.perf_counter() - start)
    busy1, own1 = cpu_seconds()
    background = max(0.0, (busy1 - busy0) - (own1 - own0)) / (sum(times) * os.cpu_count())
    return times, setup_rss, background


def run_method(method: str, warmup: int, iters: int, dense_mb: float) -> dict:
    model = build_model()
    batches = [make_batch(s) for s in range(warmup + iters)]
    kind, _, k = method.partition("-")
    k = int(k or 0)
    extra: dict = {}

    def forward_backward(b: dict) -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        summed_loss(logits, b["labels"]).backward()

    if kind == "plain":
        seconds, setup, background = bench(lambda s: forward_backward(batches[s]), warmup, iters)
    elif kind == "logix":
        tmp = tempfile.TemporaryDirectory()
        config = {"projection": {"type": "random", "rank_in": k, "rank_out": k}, "statistics": {"kfac": True}}
        run = logix.init("bench", config=config, root=tmp.name, overwrite=True)
        extra["modules"] = len(run.watch(model))

        def step(s: int) -> None:
            with run(data_id=batches[s]["data_id"], mask=batches[s]["attention_mask"]):
                forward_backward(batches[s])

        seconds, setup, background = bench(step, warmup, iters)
        start = time.perf_counter()
        store = run.finalize()
        extra["finalize_s"] = time.perf_counter() - start
        extra["rows"], extra["row_dim"] = store.n_rows, store.dim
        tmp.cleanup()
    else:
        proj = Projector(model, k, dense_mb)
        extra.update(projection_form=proj.form, dense_matrices_mb=round(proj.dense_mb, 1))
        rows: list[torch.Tensor] = []
        if kind == "loop":

            def step(s: int) -> None:
                b = batches[s]
                for i in range(BATCH):
                    forward_backward({key: v[i : i + 1] for key, v in b.items()})
                    rows.append(proj.one({n: p.grad for n, p in model.named_parameters()}))
        elif kind == "vmap":
            params = {n: p.detach() for n, p in model.named_parameters()}
            causal = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))

            def example_loss(p, ids, mask4, labels):
                logits = functional_call(model, p, (ids[None],), {"attention_mask": mask4[None]}).logits
                return summed_loss(logits, labels[None])

            per_sample = vmap(grad(example_loss), in_dims=(None, 0, 0, 0))

            def step(s: int) -> None:
                b = batches[s]
                # A ready 4D mask: transformers' 2D-mask preprocessing branches on data (no vmap).
                mask4 = causal[None, None] & b["attention_mask"].bool()[:, None, None, :]
                grads = per_sample(params, b["input_ids"], mask4, b["labels"])
                rows.append(vmap(proj.one)(grads))
        else:
            raise SystemExit(f"unknown method {method!r}")
        seconds, setup, background = bench(step, warmup, iters)
    peak = peak_rss_mb()
    # Median batch time (robust to other load on the machine) + finalize amortised per example.
    per_example = statistics.median(seconds) / BATCH + extra.get("finalize_s", 0.0) / (iters * BATCH)
    total = sum(seconds) + extra.get("finalize_s", 0.0)
    return {
        "method": method,
        "examples": iters * BATCH,
        "seconds": total,
        "examples_per_s": 1 / per_example,
        "examples_per_s_mean": iters * BATCH / total,
        "batch_s_median": statistics.median(seconds),
        "batch_s_min": min(seconds),
        "peak_rss_mb": peak,
        "setup_rss_mb": setup,
        "peak_rss_delta_mb": peak - setup,
        "background_cpu": background,
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: few iterations, k=16 only")
    ap.add_argument("--iters", type=int, help="timed batches per method (default 12, quick 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--rounds", type=int, help="subprocess runs per method, best kept (default 3, quick 1)")
    ap.add_argument("--ranks", type=int, nargs="+", help="k per side (default 16 32, quick 16)")
    ap.add_argument("--dense-mb", type=float, default=1024, help="dense baseline projection if it fits")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    ap.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = ap.parse_args()
    iters = args.iters or (3 if args.quick else 12)
    rounds = args.rounds or (1 if args.quick else 3)
    ranks = args.ranks or ([16] if args.quick else [16, 32])
    if args.method:
        print(json.dumps(run_method(args.method, args.warmup, iters, args.dense_mb)))
        return

    methods = ["plain"] + [f"{kind}-{k}" for k in ranks for kind in ("logix", "loop", "vmap")]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    common = ["--iters", str(iters), "--warmup", str(args.warmup), "--dense-mb", str(args.dense_mb)]
    load_before = os.getloadavg()
    for r in range(rounds):  # rounds interleave methods; order rotates to spread background load
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            cmd = [sys.executable, __file__, "--method", m, *common]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{m} failed:\n{proc.stderr}")
            runs[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            res = runs[m][-1]
            print(
                f"  round {r + 1}/{rounds} {m:<9} {res['examples_per_s']:6.2f} ex/s  bg CPU {res['background_cpu']:.0%}"
            )
    # Per method: the least-disturbed round (fastest), with the peak RSS over all rounds.
    results = {}
    for m, rs in runs.items():
        results[m] = dict(max(rs, key=lambda x: x["examples_per_s"]))
        results[m]["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
        results[m]["peak_rss_delta_mb"] = max(x["peak_rss_delta_mb"] for x in rs)
        results[m]["examples_per_s_rounds"] = [x["examples_per_s"] for x in rs]
    base = results["plain"]["examples_per_s"]
    ratios = {}
    for k in ranks:
        logix_eps = results[f"logix-{k}"]["examples_per_s"]
        ratios[f"logix-{k}/plain"] = logix_eps / base
        ratios[f"logix-{k}/loop-{k}"] = logix_eps / results[f"loop-{k}"]["examples_per_s"]
        ratios[f"logix-{k}/vmap-{k}"] = logix_eps / results[f"vmap-{k}"]["examples_per_s"]

    head = (
        f"{'method':<10} {'examples/s':>11} {'vs plain':>9} {'peak RSS MB':>12} {'delta MB':>9} {'bg CPU':>7}"
    )
    print(f"\n{head}  projection")
    for m, r in results.items():
        note = r.get("projection_form", "")
        print(
            f"{m:<10} {r['examples_per_s']:>11.2f} {r['examples_per_s'] / base:>9.3f} "
            f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_delta_mb']:>9.0f} {r['background_cpu']:>7.0%}  {note}"
        )
    for name, value in ratios.items():
        print(f"{name:<22} {value:.3f}")

    report = {
        "setup": {
            "model": "GPT-2 n_layer=4 n_embd=256 n_head=4 vocab=5000",
            "batch": BATCH,
            "seq_len": SEQ,
            "warmup": args.warmup,
            "iters": iters,
            "rounds": rounds,
            "ranks": ranks,
            "quick": args.quick,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "rss": "ru_maxrss of each method's own subprocess",
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

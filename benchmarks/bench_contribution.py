"""Speed and memory of the instruction-data contribution scorers.

Sections (``--section``, default all; each writes its own key of the JSON so sections can be run
and added independently):

* ``icl``: the in-context contribution pass (:func:`logix.contribution.icl.icl_contribution`) on a
  seeded GPT-2 (4 layers, d=256, 4 heads, the shipped 2048-token tokenizer, float32, CPU), shipped
  instruction records as candidates and a stratified assessment set as probes, ``control="chars"``
  (each pair costs a demonstration and a control forward). Methods, all giving the same numbers:

  * ``reference``  one full sequence ``[demonstration + sep + probe + response]`` per forward;
  * ``batched``    full sequences, ``--batch`` per forward (no prefix cache);
  * ``cached-b1``  the demonstration encoded once per candidate, its KV cache reused, one probe per forward;
  * ``cached``     prefix cache + ``--batch`` probes per forward (the default method).

  Every round times each method once, in a rotating order, in this one process; the speed-up is
  the per-round ratio ``time(reference) / time(method)`` (paired, which cancels the drift of a
  shared machine), summarised by its median. Peak memory: each method also runs once in a fresh
  subprocess and reports its peak RSS above the RSS after building the model and data and a
  1-candidate x 2-probe warm-up pass of the same method (so first-call allocations are not counted),
  sampled every 2 ms during the run.

* ``selector``: linear-time scoring of a whole pool: one embedding forward per record
  (:func:`logix.contribution.embed_records`, same model) and the ridge / logistic / MLP heads fitted on
  a scored sample (``--sample`` of ``--pool``); examples/s, fit time, held-out quality, peak memory.

    python benchmarks/bench_contribution.py               # full run (~5 min on 2 shared cores)
    python benchmarks/bench_contribution.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "bench_contribution.json"
ICL_METHODS = {  # name: (icl_contribution method, batch size or None for --batch)
    "reference": ("reference", 1),
    "batched": ("batched", None),
    "cached-b1": ("cached", 1),
    "cached": ("cached", None),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def logix_version() -> str:
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "logix"], capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


# ---- icl ---------------------------------------------------------------------------------------


def icl_setup(n_candidates: int, n_probes: int, demo_repeat: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    from logix.contribution.assessment import assessment_set
    from logix.data import load_jsonl, load_tokenizer

    tok = load_tokenizer(str(ROOT / "examples" / "data" / "tokenizer.json"))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=len(tok), n_positions=512,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    pool = load_jsonl(ROOT / "examples" / "data" / "instructions.jsonl")
    probes = assessment_set(pool[:1500], n_probes, seed=0)
    candidates = assessment_set(pool[1500:], n_candidates, seed=1)
    if demo_repeat > 1:  # longer demonstrations: the outputs of `demo_repeat` records of the task, joined
        same = {}
        for r in pool[1500:]:
            same.setdefault(r["category"], []).append(r["output"])
        candidates = [dict(c, output="; ".join(same[c["category"]][k % len(same[c["category"]])]
                                               for k in range(i, i + demo_repeat)))
                      for i, c in enumerate(candidates)]
    return model, tok, candidates, probes


def icl_run(model, tok, candidates, probes, name: str, batch: int):
    from logix.contribution.icl import icl_contribution

    method, size = ICL_METHODS[name]
    start = time.perf_counter()
    res = icl_contribution(model, tok, candidates, probes, control="chars", seed=0, method=method,
                           batch_size=size or batch, progress=False)
    return time.perf_counter() - start, res


def icl_memory(args) -> dict:
    """Run in a fresh process: peak RSS of one method above the RSS after setup and a 1 x 2 warm-up pass.

    The peak is sampled every 2 ms during the run (``ru_maxrss`` would also count transient peaks of
    the setup, such as parsing the pool).
    """
    import threading

    model, tok, candidates, probes = icl_setup(args.candidates, args.probes, args.demo_repeat)
    icl_run(model, tok, candidates[:1], probes[:2], args.memory_of, args.batch)  # load code paths first
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds, _ = icl_run(model, tok, candidates, probes, args.memory_of, args.batch)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], rss_mb())
    return {"method": args.memory_of, "peak_above_setup_mb": round(peak[0] - base, 1),
            "setup_rss_mb": round(base, 1), "seconds": round(seconds, 3)}


def bench_icl(args) -> dict:
    from logix.contribution.lm import encode
    from logix.data import PromptTemplate

    model, tok, candidates, probes = icl_setup(args.candidates, args.probes, args.demo_repeat)
    t = PromptTemplate()
    demo_len = [len(ids) for ids in encode(tok, [t.prompt(c) + t.response(c) for c in candidates])]
    probe_len = [len(a) + len(b) for a, b in zip(encode(tok, [t.prompt(p) for p in probes]),
                                                 encode(tok, [t.response(p) for p in probes]))]
    pairs = len(candidates) * len(probes)
    names = list(ICL_METHODS)
    load_before = load_average()
    icl_run(model, tok, candidates[:2], probes[:4], "cached", args.batch)  # warm-up
    times: dict[str, list[float]] = {n: [] for n in names}
    results = {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, res = icl_run(model, tok, candidates, probes, name, args.batch)
            times[name].append(seconds)
            results[name] = res
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    load_after = load_average()
    ref = results["reference"]
    methods = {}
    for name in names:
        ratios = [a / b for a, b in zip(times["reference"], times[name])]
        methods[name] = {
            "seconds": [round(x, 4) for x in times[name]],
            "pairs_per_s_best": round(pairs / min(times[name]), 2),
            "speedup_vs_reference_median": round(median(ratios), 2),
            "speedup_vs_reference_rounds": [round(x, 2) for x in ratios],
            "max_abs_diff_c_vs_reference": float(np.abs(results[name].c - ref.c).max()),
            "max_rel_diff_ppl_vs_reference": float(max(
                np.abs(getattr(results[name], k) / getattr(ref, k) - 1).max() for k in ("p0", "pt", "pr"))),
        }
    memory = {}
    for name in names:
        cmd = [sys.executable, __file__, "--memory-of", name, "--candidates", str(args.candidates),
               "--probes", str(args.probes), "--batch", str(args.batch), "--threads", str(args.threads),
               "--demo-repeat", str(args.demo_repeat)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            raise RuntimeError(f"memory run of {name} failed:\n{proc.stderr[-2000:]}")
        memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        methods[name]["peak_rss_above_setup_mb"] = memory[name]["peak_above_setup_mb"]
    return {
        "model": "GPT-2 4 layers, d=256, 4 heads, vocab 2048, float32",
        "candidates": len(candidates),
        "probes": len(probes),
        "pairs": pairs,
        "batch": args.batch,
        "control": "chars",
        "rounds": args.rounds,
        "demo_repeat": args.demo_repeat,
        "demonstration_tokens_mean": round(float(np.mean(demo_len)), 1),
        "probe_tokens_mean": round(float(np.mean(probe_len)), 1),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "torch_threads": torch.get_num_threads(),
        "methods": methods,
    }


def print_icl(section: dict) -> None:
    print(f"\nIn-context contribution (torch threads {section['torch_threads']}): {section['candidates']} candidates x {section['probes']} probes = "
          f"{section['pairs']} pairs (control chars: 2 prefixed forwards per pair), batch {section['batch']}, "
          f"demonstration {section['demonstration_tokens_mean']} tokens, probe {section['probe_tokens_mean']} tokens "
          f"(mean); load {section['load_average_before']} -> {section['load_average_after']}")
    print(f"{'method':<11} {'pairs/s (best)':>15} {'speed-up (median)':>18} {'peak RSS MB':>12} {'max |dc|':>10}")
    for name, m in section["methods"].items():
        print(f"{name:<11} {m['pairs_per_s_best']:>15.1f} {m['speedup_vs_reference_median']:>17.2f}x "
              f"{m.get('peak_rss_above_setup_mb', float('nan')):>12.1f} {m['max_abs_diff_c_vs_reference']:>10.1e}")


# ---- selector ----------------------------------------------------------------------------------


def bench_selector(args) -> dict:
    """Linear-time pool scoring: one embedding forward per record, then a head fitted on a scored sample.

    Target of the heads: each record's response length in tokens plus noise (a property the
    embeddings carry), so that the held-out Spearman / AUC show the heads learn, not only run.
    """
    import threading

    from transformers import GPT2Config, GPT2LMHeadModel

    from logix.contribution import Selector, embed_records, fit_selector, response_length
    from logix.data import load_jsonl, load_tokenizer

    tok = load_tokenizer(str(ROOT / "examples" / "data" / "tokenizer.json"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=len(tok), n_positions=512,
                                       bos_token_id=0, eos_token_id=0)).eval()
    pool = load_jsonl(ROOT / "examples" / "data" / "instructions.jsonl")[: args.pool]
    ids = [r["id"] for r in pool]
    embed_records(model, tok, pool[:8], ids[:8], batch_size=8, progress=False)  # warm-up
    base, peak, done = rss_mb(), [rss_mb()], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    load_before = load_average()
    try:
        start = time.perf_counter()
        emb = embed_records(model, tok, pool, ids, batch_size=args.batch * 4, progress=False)
        embed_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        target = response_length(pool, tok) + rng.normal(scale=1.0, size=len(pool))
        sample_rows = rng.choice(len(pool), min(args.sample, len(pool)), replace=False)
        scored = {ids[i]: float(target[i]) for i in sample_rows}
        heads = {}
        for head in ("ridge", "logistic", "mlp"):
            start = time.perf_counter()
            result = fit_selector(Selector(head, label_top_p=0.1), ids, emb, scored)
            fit_s = time.perf_counter() - start
            start = time.perf_counter()
            Selector(head).fit(emb[sample_rows], target[sample_rows]).predict(emb)
            heads[head] = {"evaluate_fit_predict_s": round(fit_s, 3),
                           "fit_predict_s": round(time.perf_counter() - start, 3),
                           "heldout_spearman": round(result.report.spearman, 3),
                           "heldout_auc": round(result.report.auc, 3)}
    finally:
        done.set()
        sampler.join()
    return {
        "model": "GPT-2 4 layers, d=256, 4 heads, vocab 2048, float32",
        "pool": len(pool), "sample": len(scored), "embedding_batch": args.batch * 4,
        "embed_seconds": round(embed_s, 3), "embed_examples_per_s": round(len(pool) / embed_s, 1),
        "heads": heads, "peak_rss_above_setup_mb": round(peak[0] - base, 1),
        "load_average_before": load_before, "load_average_after": load_average(),
        "torch_threads": torch.get_num_threads(),
    }


def print_selector(section: dict) -> None:
    print(f"\nSelector: {section['pool']} pool records embedded at {section['embed_examples_per_s']} examples/s "
          f"({section['embed_seconds']} s, peak RSS +{section['peak_rss_above_setup_mb']} MB); heads fitted on "
          f"{section['sample']} scored records (target: response length + noise)")
    print(f"{'head':<9} {'fit+predict s':>14} {'held-out spearman':>18} {'held-out AUC':>13}")
    for name, h in section["heads"].items():
        print(f"{name:<9} {h['fit_predict_s']:>14.3f} {h['heldout_spearman']:>18.3f} {h['heldout_auc']:>13.3f}")


# ---- driver --------------------------------------------------------------------------------------

SECTIONS = {"icl": (bench_icl, print_icl), "selector": (bench_selector, print_selector)}
"""name: (run(args) -> JSON-able dict, print(dict)). Add a section by adding an entry (and its options)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", action="append", choices=sorted(SECTIONS), help="run only these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--probes", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pool", type=int, default=3000, help="selector: pool records embedded and scored")
    ap.add_argument("--sample", type=int, default=300, help="selector: scored records the heads learn from")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, oversubscribed machine more threads spin and slow down)")
    ap.add_argument("--demo-repeat", type=int, default=1,
                    help="icl: lengthen each demonstration's response to the outputs of this many records of its task")
    ap.add_argument("--label", help="JSON key of the results (default: the section name); keeps runs with other options apart")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one icl method's peak memory
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(icl_memory(args)))
        return
    if args.quick:
        args.candidates, args.probes, args.rounds = 6, 12, 1
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["environment"] = {
        "logix": logix_version(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    for name in args.section or list(SECTIONS):
        run, show = SECTIONS[name]
        print(f"[{name}]", flush=True)
        section = run(args)
        section["quick"] = args.quick
        section["options"] = {k: v for k, v in vars(args).items() if k not in ("out", "memory_of", "section", "label")}
        report[args.label or name] = section
        show(section)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

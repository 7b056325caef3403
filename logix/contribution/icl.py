"""In-context contribution of instruction candidates (ICon / RICo style).

A frozen causal LM reads a candidate ``T_j = (x_j, y_j)`` as a one-shot demonstration in front of
each probe ``(x_i, y_i)`` of an assessment set S. A candidate contributes if it makes the probes'
responses more likely than a random text of the same length does:

* ``P0_i  = PPL(y_i | x_i)``
* ``PT_ij = PPL(y_i | ctx_j + sep + x_i)``            with ``ctx_j = x_j + y_j`` (prompt + response)
* ``PR_ij = PPL(y_i | rnd(ctx_j) + sep + x_i)``        with a seeded random control of the same length
* ``c_ij  = (PR_ij - PT_ij) / (P0_i + 1e-6)``;        the candidate's score is ``mean_i c_ij``.

``PPL(y | c) = exp(-(1/N) sum_k log p(y_k | c, y_<k))`` over the N response tokens only.

Tokenization: every sequence is the concatenation of separately tokenized segments,
``[bos] + ids(ctx_j) + ids(sep) + ids(x_i) + ids(y_i)`` (``[bos] + ids(x_i) + ids(y_i)`` for P0),
so the response boundary is exact and the demonstration block ``[bos] + ids(ctx_j) + ids(sep)`` is
a token prefix shared by every probe: it is encoded once per candidate and its KV cache is expanded
over batches of probes. BOS is prepended when the tokenizer uses one (see :mod:`logix.contribution.lm`).

Random controls (``control=``), seeded per candidate by ``(seed, candidate id)`` so that a resumed or
reordered pass draws the same text:

* ``"chars"``: ``len(ctx_j)`` characters drawn uniformly from ASCII letters, digits and space;
* ``"tokens"``: ``len(ids(ctx_j))`` token ids drawn uniformly from the vocabulary minus special tokens;
* ``"none"``: no control, ``PR = P0``.

Truncation: with ``max_length`` (default: the model's position limit), the demonstration (real or
random) is cut from the **left** so that the longest probe fits: it keeps at most
``max_length - len(bos) - len(ids(sep)) - max_i(len(ids(x_i)) + len(ids(y_i)))`` tokens, the same
for every probe of a candidate. A probe that leaves no room for at least one demonstration token is
an error, as are empty responses (candidate or probe) and duplicate ids.

Logs: with ``run_dir``, the pass writes crash-safe stores (:mod:`logix.store`) under
``<run_dir>/icl/``: ``probes/`` (one row per probe id: summed NLL and token count of ``y_i | x_i``),
``pairs/`` (one row per ``"{candidate_id}\\x1f{probe_id}"``: summed NLL and count with the
demonstration, then with the control) and ``meta.json`` (settings and the ordered ids). Scores are
recomputed from these logs alone by :func:`load_icl_scores`; rerunning :func:`icl_contribution` with
the same ``run_dir`` skips the committed pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import shutil
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from logix.contribution.lm import (
    Bos,
    bos_ids,
    encode,
    keep_logits_kwargs,
    model_max_length,
    response_nll_ids,
    token_nll,
)
from logix.data.template import PromptTemplate, field_of
from logix.errors import DataError, RunDirectoryError, StoreError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Control = Literal["chars", "tokens", "none"]
Method = Literal["cached", "batched", "reference"]

SEPARATOR = "\n\n\n"
EPS = 1e-6
ID_SEP = "\x1f"
CHAR_ALPHABET = string.ascii_letters + string.digits + " "
META_VERSION = 1

__all__ = [
    "IclResult",
    "assessment_set",
    "icl_contribution",
    "load_icl_scores",
    "sigmoid_map",
]


# ---------------------------------------------------------------------------------------------
# scores


def sigmoid_map(x: np.ndarray | float) -> np.ndarray:
    """``1`` if ``x > 0.5``, ``-1`` if ``x < -0.5``, else ``2 / (1 + exp(-50 x)) - 1`` (elementwise)."""
    x = np.asarray(x, dtype=np.float64)
    mid = 2.0 / (1.0 + np.exp(-50.0 * np.clip(x, -0.5, 0.5))) - 1.0
    return np.where(x > 0.5, 1.0, np.where(x < -0.5, -1.0, mid))


@dataclass
class IclResult:
    """Logged likelihoods of an in-context contribution pass and the scores derived from them.

    Arrays are indexed ``[candidate, probe]`` (``ids`` x ``probe_ids``) or ``[probe]``; NLLs are sums
    over response tokens (float64 nats), counts are response token counts.
    """

    ids: list[str]
    probe_ids: list[str]
    nll0: np.ndarray
    n0: np.ndarray
    nll_t: np.ndarray
    n_t: np.ndarray
    nll_r: np.ndarray
    n_r: np.ndarray
    control: str

    @property
    def p0(self) -> np.ndarray:
        """``PPL(y_i | x_i)`` per probe."""
        return np.exp(self.nll0 / self.n0)

    @property
    def pt(self) -> np.ndarray:
        """``PPL(y_i | ctx_j + sep + x_i)``, ``[candidate, probe]``."""
        return np.exp(self.nll_t / self.n_t)

    @property
    def pr(self) -> np.ndarray:
        """``PPL(y_i | rnd(ctx_j) + sep + x_i)`` (equal to ``p0`` with ``control="none"``)."""
        return np.exp(self.nll_r / self.n_r)

    @property
    def c(self) -> np.ndarray:
        """``c_ij = (PR_ij - PT_ij) / (P0_i + 1e-6)``; positive when the demonstration helps probe i."""
        return (self.pr - self.pt) / (self.p0[None, :] + EPS)

    @property
    def score(self) -> np.ndarray:
        """Global score of each candidate: ``mean_i c_ij``."""
        return self.c.mean(axis=1)

    @property
    def share_positive(self) -> np.ndarray:
        """Share of probes with ``c_ij > 0``."""
        return (self.c > 0).mean(axis=1)

    @property
    def variance(self) -> np.ndarray:
        """Variance of ``c_ij`` over the probes (population variance, ``ddof=0``)."""
        return self.c.var(axis=1)

    @property
    def sigmoid_score(self) -> np.ndarray:
        """``mean_i sigmoid_map(c_ij)``: a bounded score in [-1, 1] that a few extreme probes cannot dominate."""
        return sigmoid_map(self.c).mean(axis=1)

    def records(self) -> list[dict[str, Any]]:
        """One dict per candidate: ``id, score, share_positive, variance, sigmoid_score``."""
        cols = (self.score, self.share_positive, self.variance, self.sigmoid_score)
        return [
            {"id": cid, "score": float(s), "share_positive": float(p), "variance": float(v), "sigmoid_score": float(g)}
            for cid, s, p, v, g in zip(self.ids, *cols)
        ]

    def subset(self, ids: Sequence[str]) -> IclResult:
        """The result restricted to the given candidate ids (in that order)."""
        where = {cid: i for i, cid in enumerate(self.ids)}
        rows = [where[str(i)] for i in ids]
        return dataclasses.replace(
            self, ids=[self.ids[r] for r in rows], nll_t=self.nll_t[rows], n_t=self.n_t[rows],
            nll_r=self.nll_r[rows], n_r=self.n_r[rows],
        )


# ---------------------------------------------------------------------------------------------
# assessment set


def assessment_set(
    pool: Sequence[Mapping[str, Any]],
    size: int,
    category_key: str = "category",
    seed: int = 0,
    allocation: Literal["proportional", "equal"] = "proportional",
) -> list[Mapping[str, Any]]:
    """Stratified sample of ``size`` records from ``pool`` by the value of ``category_key``.

    ``"proportional"`` gives each category ``floor(size * n_c / N)`` records and hands the rest out
    by largest remainder; ``"equal"`` gives every category the same share, capped by what it holds
    (the surplus goes to the others). Records are drawn without replacement with
    ``numpy.random.default_rng(seed)``, categories in sorted order; the sample keeps pool order.

    Raises:
        DataError: ``size`` is not in ``1..len(pool)``, a record lacks the category, or an option is invalid.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(pool):
        raise DataError(f"size must be an integer in 1..{len(pool)} (the pool size), got {size!r}")
    if allocation not in ("proportional", "equal"):
        raise DataError(f"allocation must be 'proportional' or 'equal', got {allocation!r}")
    groups: dict[Any, list[int]] = {}
    for index, record in enumerate(pool):
        value = field_of(record, category_key, "category field")
        try:
            groups.setdefault(value, []).append(index)
        except TypeError:
            raise DataError(f"record {index}: category {value!r} is not hashable; use a str or int") from None
    cats = sorted(groups, key=lambda c: (str(type(c)), str(c)))
    counts = np.array([len(groups[c]) for c in cats])
    quotas = _proportional(counts, size) if allocation == "proportional" else _equal(counts, size)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for cat, quota in zip(cats, quotas):
        if quota:
            chosen.extend(int(i) for i in rng.choice(groups[cat], size=int(quota), replace=False))
    return [pool[i] for i in sorted(chosen)]


def _proportional(counts: np.ndarray, size: int) -> np.ndarray:
    exact = counts * size / counts.sum()
    quotas = np.floor(exact).astype(int)
    rest = size - quotas.sum()
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:rest]] += 1
    return quotas


def _equal(counts: np.ndarray, size: int) -> np.ndarray:
    quotas = np.zeros_like(counts)
    left = size
    while left > 0:
        open_ = np.flatnonzero(quotas < counts)
        share = max(left // len(open_), 1)
        for k in open_:
            take = min(share, counts[k] - quotas[k], left)
            quotas[k] += take
            left -= take
            if left == 0:
                break
    return quotas


# ---------------------------------------------------------------------------------------------
# preparation


@dataclass
class _Plan:
    bos: list[int]
    cand_ids: list[str]
    probe_ids: list[str]
    demo: list[list[int]]  # per candidate: truncated ids(ctx_j) + ids(sep)
    ctrl: list[list[int]] | None  # per candidate: truncated control + ids(sep); None for control "none"
    x: list[list[int]]
    y: list[list[int]]
    max_length: int | None
    budget: int | None


def _ids_of(records: Sequence[Mapping[str, Any]], id_field: str, what: str) -> list[str]:
    present = [isinstance(r, Mapping) and id_field in r for r in records]
    if any(not isinstance(r, Mapping) for r in records):
        bad = present.index(False)
        raise DataError(f"{what} {bad} is a {type(records[bad]).__name__}, not a record (a mapping)")
    if all(present):
        ids = [r[id_field] for r in records]
        for i, v in enumerate(ids):
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise DataError(f"{what} {i}: id {v!r} must be a str or an int")
        ids = [str(v) for v in ids]
    elif any(present):
        raise DataError(f"{what} {present.index(False)} has no {id_field!r} but others do; give every {what} an id "
                        "or none (then ids are content hashes)")
    else:
        ids = [_content_id(r) for r in records]
    for i, v in enumerate(ids):
        if ID_SEP in v:
            raise DataError(f"{what} {i}: id {v!r} contains the reserved character \\x1f; rename it")
    dup = [v for v, n in Counter(ids).items() if n > 1]
    if dup:
        raise DataError(f"{len(dup)} duplicate {what} id(s), e.g. {dup[:3]}; deduplicate the {what}s")
    return ids


def _content_id(record: Mapping[str, Any]) -> str:
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _rng(seed: int, cand_id: str) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}{ID_SEP}{cand_id}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _vocabulary(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    size = len(tokenizer)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and hasattr(embeddings, "num_embeddings"):
        size = min(size, int(embeddings.num_embeddings))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = np.array([i for i in range(size) if i not in special], dtype=np.int64)
    if vocab.size == 0:
        raise DataError("the tokenizer has no ordinary tokens to draw a random control from")
    return vocab


def _plan(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Sequence[Mapping[str, Any]],
    probes: Sequence[Mapping[str, Any]],
    template: PromptTemplate,
    control: str,
    seed: int,
    separator: str,
    max_length: int | None,
    bos: Bos,
    id_field: str,
) -> _Plan:
    if control not in ("chars", "tokens", "none"):
        raise DataError(f"control must be 'chars', 'tokens' or 'none', got {control!r}")
    if not candidates:
        raise DataError("no candidates to score")
    if not probes:
        raise DataError("the assessment set (probes) is empty; build one with assessment_set()")
    cand_ids = _ids_of(candidates, id_field, "candidate")
    probe_ids = _ids_of(probes, id_field, "probe")
    bos_list = bos_ids(tokenizer, bos)
    if max_length is None:
        max_length = model_max_length(model)
    for what, records, ids in (("candidate", candidates, cand_ids), ("probe", probes, probe_ids)):
        for rid, record in zip(ids, records):
            if not template.response(record).strip():
                raise DataError(f"{what} {rid!r} has an empty response ({template.output_field!r}); drop it before scoring")
    x = encode(tokenizer, [template.prompt(p) for p in probes])
    y = encode(tokenizer, [template.response(p) for p in probes])
    texts = [template.prompt(c) + template.response(c) for c in candidates]
    demo = encode(tokenizer, texts)
    sep = encode(tokenizer, [separator])[0]
    for pid, yi in zip(probe_ids, y):
        if not yi:
            raise DataError(f"probe {pid!r}: its response has no tokens; drop it before scoring")
    budget = None
    if max_length is not None:
        longest = max(len(a) + len(b) for a, b in zip(x, y))
        budget = max_length - len(bos_list) - len(sep) - longest
        if budget < 1:
            worst = probe_ids[int(np.argmax([len(a) + len(b) for a, b in zip(x, y)]))]
            raise DataError(f"probe {worst!r} has {longest} tokens, leaving no room for a demonstration within "
                            f"max_length={max_length}; raise max_length or drop long probes")

    def fit(ids: list[int]) -> list[int]:
        if budget is not None and len(ids) > budget:
            ids = ids[len(ids) - budget:]
        return ids + sep

    ctrl: list[list[int]] | None = None
    if control == "chars":
        rand_texts = []
        for cid, text in zip(cand_ids, texts):
            picks = _rng(seed, cid).integers(0, len(CHAR_ALPHABET), size=len(text))
            rand_texts.append("".join(CHAR_ALPHABET[k] for k in picks))
        ctrl = [fit(ids) for ids in encode(tokenizer, rand_texts)]
    elif control == "tokens":
        vocab = _vocabulary(model, tokenizer)
        ctrl = [fit(vocab[_rng(seed, cid).integers(0, vocab.size, size=len(d))].tolist())
                for cid, d in zip(cand_ids, demo)]
    return _Plan(bos_list, cand_ids, probe_ids, [fit(d) for d in demo], ctrl, x, y, max_length, budget)


# ---------------------------------------------------------------------------------------------
# scoring one candidate against many probes


def _cache_kwarg(model: torch.nn.Module) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def _expand_cache(cache: Any, batch: int) -> Any:
    """A fresh cache holding the prefix's keys and values ``batch`` times (prefix tensors untouched)."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None
                      for layer in layers):
        try:  # plain full-attention layers: share the prefix tensors as stride-0 views, no copy
            data = [(layer.keys.expand(batch, *layer.keys.shape[1:]), layer.values.expand(batch, *layer.values.shape[1:]))
                    for layer in layers]
            return type(cache)(data)
        except TypeError:
            pass
    fresh = copy.deepcopy(cache)
    fresh.batch_repeat_interleave(batch)
    return fresh


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.inference_mode()
def cached_response_nll(
    model: torch.nn.Module,
    prefix: Sequence[int],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of each ``responses[i]`` given ``prefix + prompts[i]``, encoding ``prefix`` once.

    The prefix's KV cache is expanded over right-padded batches of ``prompts[i] + responses[i]``.
    Equal (to float tolerance) to scoring each ``prefix + prompts[i] + responses[i]`` on its own.
    """
    if not prefix:
        raise DataError("cached scoring needs a non-empty prefix")
    device = _device(model)
    kwarg = _cache_kwarg(model)
    n = len(prompts)
    nll = np.zeros(n, dtype=np.float64)
    count = np.array([len(r) for r in responses], dtype=np.int64)
    head = torch.tensor([list(prefix)], dtype=torch.long, device=device)
    out = model(input_ids=head, use_cache=True, **keep_logits_kwargs(model, 1))
    cache = _out_cache(out)
    last = out.logits[0, -1]
    lp = head.shape[1]
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    for lo in range(0, n, batch_size):
        chunk = order[lo:lo + batch_size]
        b = len(chunk)
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.full((b, width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, lp + width), dtype=torch.long)
        mask[:, :lp] = 1
        for row, i in enumerate(chunk):
            ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[row, lp:lp + len(seqs[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = torch.arange(lp, lp + width, device=device).unsqueeze(0).expand(b, width)
        first = max(min(len(prompts[i]) for i in chunk) - 1, 0)  # first position whose logits are needed
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{kwarg: _expand_cache(cache, b)}, **keep_logits_kwargs(model, width - first)).logits
        offset = width - logits.shape[1]
        rows, cols = [], []
        for row, i in enumerate(chunk):
            start = len(prompts[i])
            rows.extend([row] * (len(seqs[i]) - start))
            cols.extend(range(start, len(seqs[i])))
        r = torch.tensor(rows, device=device)
        c = torch.tensor(cols, device=device)
        # the logit predicting probe token t is logits[t - 1], or the prefix's last logit for t == 0
        picked = logits[r, (c - 1).clamp(min=0) - offset]
        picked = torch.where((c == 0).unsqueeze(-1), last.to(picked.dtype).unsqueeze(0), picked)
        per_token = token_nll(picked, ids[r, c]).double().cpu()
        sums = torch.zeros(b, dtype=torch.float64).index_add_(0, r.cpu(), per_token)
        nll[chunk] = sums.numpy()
    return nll, count


def _score_prefix(
    model: torch.nn.Module,
    plan: _Plan,
    segment: list[int],
    probes: list[int],
    method: str,
    batch_size: int,
    pad: int,
) -> tuple[np.ndarray, np.ndarray]:
    xs = [plan.x[i] for i in probes]
    ys = [plan.y[i] for i in probes]
    if method == "cached":
        return cached_response_nll(model, plan.bos + segment, xs, ys, batch_size=batch_size, pad_token_id=pad)
    prefixes = [segment + x for x in xs]
    size = 1 if method == "reference" else batch_size
    return response_nll_ids(model, prefixes, ys, bos=plan.bos, batch_size=size, max_length=None, pad_token_id=pad)


# ---------------------------------------------------------------------------------------------
# logs


def _meta(plan: _Plan, model: torch.nn.Module, tokenizer: Any, template: PromptTemplate, control: str,
          seed: int, separator: str) -> dict[str, Any]:
    return {
        "version": META_VERSION,
        "control": control,
        "seed": int(seed),
        "separator": separator,
        "template": dataclasses.asdict(template),
        "bos": plan.bos,
        "max_length": plan.max_length,
        "demonstration_budget": plan.budget,
        "model": {
            "class": type(model).__name__,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "name_or_path": str(getattr(getattr(model, "config", None), "name_or_path", "")),
        },
        "tokenizer": {"class": type(tokenizer).__name__, "size": len(tokenizer)},
        "candidate_ids": plan.cand_ids,
        "probe_ids": plan.probe_ids,
    }


def _open_writer(directory: Path, width: int):
    from logix.store import Layout, ShardWriter

    layout = Layout.build([("icl", "icl", (1, width))])
    writer = ShardWriter(directory, layout, "float64", per_token=False)
    writer.set_id_type("str")
    return writer


def _committed(directory: Path) -> dict[str, np.ndarray]:
    """``{id: row}`` of every committed row (shards named in the manifest only), rows in float64.

    Read with h5py from the store format directly: the generic reader targets float16/32 gradient rows.
    """
    import h5py

    from logix.store.format import read_manifest

    manifest = read_manifest(directory)
    if manifest is None:
        return {}
    out: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        with h5py.File(directory / shard["file"], "r") as fh:
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in fh["ids"][()]]
            out.update(zip(ids, np.asarray(fh["rows"][()], dtype=np.float64)))
    return out


def _check_meta(path: Path, meta: dict[str, Any], overwrite: bool) -> None:
    icl_dir = path.parent
    if path.exists():
        if overwrite:
            shutil.rmtree(icl_dir)
        else:
            old = json.loads(path.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise RunDirectoryError(
                    f"{icl_dir} holds an in-context pass with different {', '.join(diff)}; "
                    "use a new run_dir or pass overwrite=True")
            return
    elif icl_dir.exists() and overwrite:
        shutil.rmtree(icl_dir)
    icl_dir.mkdir(parents=True, exist_ok=True)
    from logix.store.format import write_json_atomic

    write_json_atomic(path, meta)


def load_icl_scores(run_dir: str | Path, partial: bool = False) -> IclResult:
    """Recompute the in-context scores from the logs of a pass, without the model.

    Args:
        run_dir: The ``run_dir`` given to :func:`icl_contribution`.
        partial: Return only the candidates whose every pair is committed, instead of failing when
            the pass was interrupted.

    Raises:
        StoreError: There are no logs, or (without ``partial``) the pass is incomplete.
    """
    icl_dir = Path(run_dir) / "icl"
    path = icl_dir / "meta.json"
    if not path.exists():
        raise StoreError(f"no in-context contribution logs at {icl_dir} (no meta.json); run icl_contribution "
                         "with run_dir first")
    meta = json.loads(path.read_text())
    probes = _committed(icl_dir / "probes")
    pairs = _committed(icl_dir / "pairs")
    probe_ids = meta["probe_ids"]
    missing_p = [p for p in probe_ids if p not in probes]
    if missing_p:
        raise StoreError(f"{icl_dir}: {len(missing_p)} probe(s) have no logged P0 (e.g. {missing_p[0]!r}); the pass "
                         "was interrupted: rerun icl_contribution with the same run_dir to resume")
    done = [c for c in meta["candidate_ids"] if all(f"{c}{ID_SEP}{p}" in pairs for p in probe_ids)]
    if len(done) < len(meta["candidate_ids"]) and not partial:
        raise StoreError(f"{icl_dir}: {len(meta['candidate_ids']) - len(done)} of {len(meta['candidate_ids'])} "
                         "candidates are not fully scored; rerun icl_contribution with the same run_dir to resume, "
                         "or pass partial=True")
    p0 = np.array([probes[p] for p in probe_ids]).reshape(len(probe_ids), 2)
    rows = np.array([[pairs[f"{c}{ID_SEP}{p}"] for p in probe_ids] for c in done]).reshape(len(done), len(probe_ids), 4)
    return IclResult(
        ids=done, probe_ids=list(probe_ids), nll0=p0[:, 0], n0=p0[:, 1].astype(np.int64),
        nll_t=rows[..., 0], n_t=rows[..., 1].astype(np.int64), nll_r=rows[..., 2], n_r=rows[..., 3].astype(np.int64),
        control=meta["control"],
    )


# ---------------------------------------------------------------------------------------------
# the pass


def icl_contribution(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Sequence[Mapping[str, Any]],
    probes: Sequence[Mapping[str, Any]],
    *,
    template: PromptTemplate | None = None,
    control: Control = "chars",
    seed: int = 0,
    batch_size: int = 8,
    separator: str = SEPARATOR,
    max_length: int | None = None,
    bos: Bos = "auto",
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    commit_every: int = 1024,
    method: Method = "cached",
    id_field: str = "id",
    progress: bool = True,
) -> IclResult:
    """Score every candidate by its in-context contribution to the probes (see the module docstring).

    Args:
        model: A frozen causal LM (Hugging Face ``*ForCausalLM`` with a KV cache); run in eval mode
            under ``torch.inference_mode`` (its training flag is restored).
        tokenizer: The model's tokenizer.
        candidates: Records with the template's fields (instruction / input / output) and ``id_field``
            (or none of them with it: then content hashes are the ids).
        probes: The assessment set, in the same format (see :func:`assessment_set`).
        template: Prompt format, Alpaca by default.
        control: ``"chars"``, ``"tokens"`` or ``"none"``.
        seed: Seed of the random control.
        batch_size: Probes per forward pass.
        separator: Text between the demonstration and the probe.
        max_length: Longest sequence; demonstrations are cut from the left to fit. Default: the
            model's position limit.
        bos: ``"auto"``, ``True`` or ``False``.
        run_dir: Write crash-safe logs under ``<run_dir>/icl`` and resume from them.
        overwrite: Discard logs of an earlier pass in ``run_dir`` instead of resuming.
        commit_every: Pairs per committed shard (what an interruption can lose at most).
        method: ``"cached"`` (prefix KV cache + batches, the default), ``"batched"`` (full sequences
            in batches) or ``"reference"`` (one full sequence at a time); all give the same numbers.
        id_field: The record key of ids.
        progress: Show a tqdm bar over candidates.

    Returns:
        The :class:`IclResult` (equal to :func:`load_icl_scores` of ``run_dir`` afterwards).

    Raises:
        DataError: Bad records or options (empty responses, duplicate ids, probes too long).
        RunDirectoryError: ``run_dir`` holds a pass with other settings or other ids.
    """
    from tqdm.auto import tqdm

    if method not in ("cached", "batched", "reference"):
        raise DataError(f"method must be 'cached', 'batched' or 'reference', got {method!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
        raise DataError(f"commit_every must be a positive integer, got {commit_every!r}")
    template = PromptTemplate() if template is None else template
    plan = _plan(model, tokenizer, candidates, probes, template, control, seed, separator, max_length, bos, id_field)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    n_c, n_p = len(plan.cand_ids), len(plan.probe_ids)

    done_probes: dict[str, np.ndarray] = {}
    done_pairs: dict[str, np.ndarray] = {}
    icl_dir = None if run_dir is None else Path(run_dir) / "icl"
    if icl_dir is not None:
        _check_meta(icl_dir / "meta.json", _meta(plan, model, tokenizer, template, control, seed, separator), overwrite)
        done_probes = _committed(icl_dir / "probes")
        done_pairs = _committed(icl_dir / "pairs")

    was_training = model.training
    model.eval()
    try:
        # P0 per probe
        todo = [i for i, p in enumerate(plan.probe_ids) if p not in done_probes]
        if todo:
            nll, cnt = response_nll_ids(model, [plan.x[i] for i in todo], [plan.y[i] for i in todo], bos=plan.bos,
                                        batch_size=1 if method == "reference" else batch_size, pad_token_id=pad)
            new = {plan.probe_ids[i]: np.array([a, b], dtype=np.float64) for i, a, b in zip(todo, nll, cnt)}
            if icl_dir is not None:
                _write(icl_dir / "probes", 2, new)
            done_probes.update(new)
        p0 = np.array([done_probes[p] for p in plan.probe_ids])

        # PT and PR per pair
        writer = _open_writer(icl_dir / "pairs", 4) if icl_dir is not None else None
        buffer: dict[str, np.ndarray] = {}
        try:
            for j in tqdm(range(n_c), disable=not progress, desc="in-context contribution", unit="cand"):
                cid = plan.cand_ids[j]
                todo = [i for i, p in enumerate(plan.probe_ids) if f"{cid}{ID_SEP}{p}" not in done_pairs]
                if not todo:
                    continue
                nll_t, n_t = _score_prefix(model, plan, plan.demo[j], todo, method, batch_size, pad)
                if plan.ctrl is None:
                    nll_r, n_r = p0[todo, 0], p0[todo, 1]
                else:
                    nll_r, n_r = _score_prefix(model, plan, plan.ctrl[j], todo, method, batch_size, pad)
                for k, i in enumerate(todo):
                    key = f"{cid}{ID_SEP}{plan.probe_ids[i]}"
                    row = np.array([nll_t[k], n_t[k], nll_r[k], n_r[k]], dtype=np.float64)
                    buffer[key] = row
                    done_pairs[key] = row
                if writer is not None and len(buffer) >= commit_every:
                    _submit(writer, buffer)
                    buffer = {}
            if writer is not None:
                if buffer:
                    _submit(writer, buffer)
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    finally:
        model.train(was_training)

    rows = np.array([[done_pairs[f"{c}{ID_SEP}{p}"] for p in plan.probe_ids] for c in plan.cand_ids])
    rows = rows.reshape(n_c, n_p, 4)
    return IclResult(
        ids=list(plan.cand_ids), probe_ids=list(plan.probe_ids), nll0=p0[:, 0], n0=p0[:, 1].astype(np.int64),
        nll_t=rows[..., 0], n_t=rows[..., 1].astype(np.int64), nll_r=rows[..., 2], n_r=rows[..., 3].astype(np.int64),
        control=control,
    )


def _submit(writer: Any, rows: dict[str, np.ndarray]) -> None:
    writer.submit(torch.from_numpy(np.stack(list(rows.values()))), list(rows))


def _write(directory: Path, width: int, rows: dict[str, np.ndarray]) -> None:
    writer = _open_writer(directory, width)
    try:
        _submit(writer, rows)
        writer.close()
    except BaseException:
        writer.abort()
        raise

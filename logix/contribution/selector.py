"""Scoring a whole pool in linear time: a light model trained on the scores of a scored sample.

Contribution scores cost model passes per candidate (and per probe, for the in-context score),
so they are computed on a sample; a selector learns them and scores every pool item in one pass:

1. :func:`embed_records` logs one embedding per record in a single forward pass of a frozen LM
   (mean of the last hidden states over the record's tokens, or the last token's), into a logix
   store when ``store_dir`` is given (crash-safe, resumable, readable without the model).
2. :class:`Selector` fits a small head on (embedding, score) pairs of the scored sample:
   ``ridge`` (closed form, L2 strength chosen by exact leave-one-out error), ``logistic``
   (binary label = top ``label_top_p`` of the sample by score) or ``mlp`` (one hidden layer,
   early-stopped on a validation split). :class:`LoraSelector` instead fine-tunes a LoRA
   sequence classifier on the records' text with the binary label, as in the original recipe.
3. :meth:`Selector.evaluate` reports the held-out Spearman correlation and AUC (of the top
   ``label_top_p`` by true score) of the selector's predictions; :func:`fit_selector` does 1-3 and
   predicts every pool item.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from logix.analysis.evaluate import spearman
from logix.data import PromptTemplate
from logix.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

HEADS = ("ridge", "logistic", "mlp")
POOLINGS = ("mean", "last")
EMBEDDING_BLOCK = "embedding"


# ---- embeddings ----------------------------------------------------------------------------------
def _texts(records: Sequence[Mapping[str, Any]], template: PromptTemplate) -> list[str]:
    return [template.prompt(r) + template.response(r) for r in records]


@torch.no_grad()
def _embed_batch(model: nn.Module, tokenizer, texts: list[str], pooling: str, max_length: int) -> Tensor:
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    from logix.contribution.lm import keep_logits_kwargs

    out = model(**enc, output_hidden_states=True, **keep_logits_kwargs(model, 1))  # no full-vocab logits
    hidden = out.hidden_states[-1].float()
    mask = enc["attention_mask"].to(hidden.dtype)
    if pooling == "mean":
        return ((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)).cpu()
    if tokenizer.padding_side == "left":
        return hidden[:, -1].cpu()
    last = (enc["attention_mask"].sum(1) - 1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].cpu()



def embed_records(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    ids: Sequence,
    *,
    template: PromptTemplate | None = None,
    pooling: str = "mean",
    batch_size: int = 16,
    max_length: int = 512,
    store_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """One embedding per record (prompt + response) from a frozen LM's last hidden states.

    Args:
        model: A transformers model that accepts ``output_hidden_states=True``.
        tokenizer: Its tokenizer (needs a pad token).
        records: Instruction records.
        ids: Their ids (unique).
        template: Prompt format (Alpaca by default).
        pooling: ``mean`` over the record's tokens, or the ``last`` token.
        batch_size: Records per forward pass.
        max_length: Tokens kept per record (truncated on the right).
        store_dir: Log the embeddings to a logix store here; records already committed are not
            recomputed (an interrupted pass resumes).
        progress: Show a progress bar.

    Returns:
        ``(len(records), hidden)`` float32 array, in the order of ``records``.

    Raises:
        DataError: Unknown pooling, ids and records disagree, or a record lacks a field.
    """
    if pooling not in POOLINGS:
        raise DataError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(ids) != len(records):
        raise DataError(f"{len(ids)} ids for {len(records)} records")
    if tokenizer.pad_token is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    template = template or PromptTemplate()
    texts = _texts(records, template)
    was_training = model.training
    model.eval()
    try:
        if store_dir is None:
            chunks = [
                _embed_batch(model, tokenizer, texts[i:i + batch_size], pooling, max_length)
                for i in tqdm(range(0, len(texts), batch_size), desc="logix embed", disable=not progress)
            ]
            return torch.cat(chunks).numpy()
        return _embed_logged(model, tokenizer, texts, list(ids), pooling, batch_size, max_length,
                             Path(store_dir), progress)
    finally:
        model.train(was_training)


def _embed_logged(model, tokenizer, texts, ids, pooling, batch_size, max_length, store_dir, progress) -> np.ndarray:
    from logix.config import DuplicatePolicy
    from logix.store import Store
    from logix.store.format import Layout
    from logix.store.runinfo import normalise_ids
    from logix.store.sink import StoreSink

    hidden = int(model.config.hidden_size)
    layout = Layout.build([(EMBEDDING_BLOCK, EMBEDDING_BLOCK, (1, hidden))])
    sink = StoreSink(store_dir, layout, "float32", per_token=False, shard_rows=1024, queue_shards=2,
                     duplicates=DuplicatePolicy.ERROR)
    try:
        if sink.writer.manifest["layout"] != layout.to_json():
            raise DataError(f"{store_dir} holds embeddings of another shape; use a new store_dir")
        norm_ids, id_type = normalise_ids(ids)
        sink.check_id_type(id_type)
        todo = [i for i, key in enumerate(norm_ids) if key not in sink.committed]
        for start in tqdm(range(0, len(todo), batch_size), desc="logix embed", disable=not progress):
            part = todo[start:start + batch_size]
            rows = _embed_batch(model, tokenizer, [texts[i] for i in part], pooling, max_length)
            keys = [norm_ids[i] for i in part]
            keep = sink.keep_mask(keys)
            sink.add(rows[keep], [k for k, m in zip(keys, keep) if m], None, keys)
    finally:
        sink.close()
    return Store(store_dir).get(norm_ids).float().numpy()


# ---- heads ---------------------------------------------------------------------------------------
def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.where(std > 1e-12, std, 1.0)


def _top_labels(y: np.ndarray, top_p: float) -> np.ndarray:
    """1 for the top ``top_p`` fraction of ``y`` (at least one), else 0."""
    n = max(1, int(math.ceil(top_p * y.shape[0])))
    labels = np.zeros(y.shape[0], dtype=np.float64)
    labels[np.argsort(-y, kind="stable")[:n]] = 1.0
    return labels


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count one half); NaN if one class."""
    from logix.analysis.evaluate import _rank

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _rank(np.asarray(scores, np.float64)[:, None])[:, 0] + 1.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ridge_fit(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, float, float]:
    """Ridge on centred data with the alpha of least exact leave-one-out error (via the SVD)."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    best = (math.inf, None, None)
    n = x.shape[0]
    for alpha in alphas:
        shrink = s**2 / (s**2 + alpha)
        fitted = u @ (shrink * uty)
        hat = (u**2 * shrink).sum(1) + 1.0 / n  # + intercept's leverage
        loo = (y - fitted) / np.clip(1.0 - hat, 1e-12, None)
        err = float(np.mean(loo**2))
        if err < best[0]:
            best = (err, alpha, vt.T @ (s / (s**2 + alpha) * uty))
    return best[2], best[1], best[0]


class Selector:
    """A light head from embeddings to contribution scores (see the module docstring).

    Args:
        head: ``ridge`` | ``logistic`` | ``mlp``.
        label_top_p: For ``logistic``: the fraction of the scored sample labelled 1 (top by score);
            also the positive class of :meth:`evaluate`'s AUC.
        alphas: Ridge strengths tried (relative to the mean squared singular value of the features).
        hidden: MLP hidden width.
        epochs: MLP / logistic training epochs (full batch).
        seed: Seed of the MLP's initialisation and validation split.
    """

    def __init__(self, head: str = "ridge", *, label_top_p: float = 0.1, alphas: Sequence[float] = (1e-3, 1e-2, 1e-1, 1, 10, 100),
                 hidden: int = 128, epochs: int = 300, weight_decay: float = 1e-3, seed: int = 0) -> None:
        if head not in HEADS:
            raise DataError(f"unknown selector head {head!r}; choose one of {HEADS} (or LoraSelector)")
        if not 0 < label_top_p < 1:
            raise DataError(f"label_top_p must be in (0, 1), got {label_top_p!r}")
        self.head, self.label_top_p, self.alphas = head, label_top_p, tuple(alphas)
        self.hidden, self.epochs, self.weight_decay, self.seed = hidden, epochs, weight_decay, seed
        self.fitted: dict[str, Any] | None = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> Selector:
        """Fit on embeddings ``x`` (n, d) and scores ``y`` (n,); NaN scores are ignored.

        Raises:
            DataError: Shapes disagree or fewer than 4 scored examples.
        """
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64).reshape(-1)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise DataError(f"embeddings {x.shape} and scores {y.shape} do not match")
        ok = ~np.isnan(y)
        x, y = x[ok], y[ok]
        if x.shape[0] < 4:
            raise DataError(f"a selector needs at least 4 scored examples, got {x.shape[0]}")
        mean, std = _standardize(x)
        z = (x - mean) / std
        fitted: dict[str, Any] = {"mean": mean, "std": std}
        if self.head == "ridge":
            y_mean = y.mean()
            scale = float(np.mean(z**2)) * z.shape[1]  # mean squared singular value
            w, alpha, err = _ridge_fit(z, y - y_mean, [a * scale for a in self.alphas])
            fitted.update(w=w, b=y_mean, alpha=alpha / scale, loo_mse=err)
        else:
            fitted.update(net=self._fit_torch(z, y), y_mean=float(y.mean()), y_std=float(y.std() or 1.0))
        self.fitted = fitted
        return self

    def _fit_torch(self, z: np.ndarray, y: np.ndarray) -> nn.Module:
        gen = torch.Generator().manual_seed(self.seed)
        torch_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            d = z.shape[1]
            if self.head == "logistic":
                net: nn.Module = nn.Linear(d, 1)
                target = torch.tensor(_top_labels(y, self.label_top_p), dtype=torch.float32)
                loss_fn = nn.BCEWithLogitsLoss()
            else:
                net = nn.Sequential(nn.Linear(d, self.hidden), nn.GELU(), nn.Linear(self.hidden, 1))
                target = torch.tensor((y - y.mean()) / (y.std() or 1.0), dtype=torch.float32)
                loss_fn = nn.MSELoss()
        finally:
            torch.random.set_rng_state(torch_state)
        inputs = torch.tensor(z, dtype=torch.float32)
        n = inputs.shape[0]
        perm = torch.randperm(n, generator=gen)
        n_val = max(1, n // 10) if self.head == "mlp" and n >= 20 else 0
        val, tr = perm[:n_val], perm[n_val:]
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=self.weight_decay)
        best, best_state, patience = math.inf, None, 0
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = loss_fn(net(inputs[tr]).squeeze(-1), target[tr])
            loss.backward()
            opt.step()
            if n_val:
                with torch.no_grad():
                    v = float(loss_fn(net(inputs[val]).squeeze(-1), target[val]))
                if v < best - 1e-6:
                    best, best_state, patience = v, {k: t.clone() for k, t in net.state_dict().items()}, 0
                else:
                    patience += 1
                    if patience >= 30:
                        break
        if best_state is not None:
            net.load_state_dict(best_state)
        return net.eval()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted scores (ridge / mlp: on the scale of the training scores; logistic: log-odds of the top class)."""
        if self.fitted is None:
            raise DataError("fit the selector before predict()")
        z = (np.asarray(x, np.float64) - self.fitted["mean"]) / self.fitted["std"]
        if self.head == "ridge":
            return z @ self.fitted["w"] + self.fitted["b"]
        with torch.no_grad():
            out = self.fitted["net"](torch.tensor(z, dtype=torch.float32)).squeeze(-1).double().numpy()
        if self.head == "mlp":
            out = out * self.fitted["y_std"] + self.fitted["y_mean"]
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, holdout: float = 0.2, seed: int | None = None) -> SelectorReport:
        """Fit on a random ``1 - holdout`` of the scored sample and report Spearman / AUC on the rest.

        The selector is left fitted on the training part; call :meth:`fit` on everything afterwards.
        """
        return _holdout(self, x, y, holdout, self.seed if seed is None else seed, self.label_top_p)


@dataclass
class SelectorReport:
    """Held-out quality of a selector: Spearman with the true scores and AUC of their top fraction."""

    spearman: float
    auc: float
    n_train: int
    n_holdout: int
    head: str

    def as_dict(self) -> dict[str, Any]:
        return {"spearman": self.spearman, "auc": self.auc, "n_train": self.n_train,
                "n_holdout": self.n_holdout, "head": self.head}


def _holdout(model, x, y, holdout: float, seed: int, top_p: float) -> SelectorReport:
    y = np.asarray(y, np.float64).reshape(-1)
    if not 0 < holdout < 1:
        raise DataError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    scored = np.flatnonzero(~np.isnan(y))
    perm = np.random.default_rng(seed).permutation(scored)
    n_hold = max(2, int(round(holdout * perm.size)))
    if perm.size - n_hold < 4:
        raise DataError(f"{perm.size} scored examples are too few to hold {holdout:.0%} out; score more")
    test, train = perm[:n_hold], perm[n_hold:]
    model.fit(_take(x, train), y[train])
    pred = model.predict(_take(x, test))
    rho = float(spearman(pred[:, None], y[test][:, None])[0])
    return SelectorReport(rho, auc(pred, _top_labels(y[test], top_p)), int(train.size), int(test.size),
                          getattr(model, "head", "lora"))


def _take(x, index: np.ndarray):
    if isinstance(x, np.ndarray):
        return x[index]
    return [x[i] for i in index]


# ---- LoRA sequence classifier --------------------------------------------------------------------
class LoraSelector:
    """A LoRA-adapted sequence classifier on the records' text; label 1 = top ``label_top_p`` by score.

    Built from a causal LM (its weights initialise the classifier's body) or a hub name.

    Args:
        model: A transformers causal LM, or a name for ``AutoModelForSequenceClassification.from_pretrained``.
        tokenizer: Its tokenizer (needs a pad token).
        template: Prompt format (Alpaca by default).
        r, alpha, dropout: LoRA rank, scale and dropout.
        target_modules: Module names LoRA adapts (peft's defaults for the architecture when None).
        epochs, lr, batch_size, max_length: Training of the adapter and the classification head.
    """

    head = "lora"

    def __init__(self, model: nn.Module | str, tokenizer: PreTrainedTokenizerBase, *, template: PromptTemplate | None = None,
                 label_top_p: float = 0.1, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None, epochs: int = 3, lr: float = 1e-3,
                 batch_size: int = 8, max_length: int = 256, seed: int = 0, progress: bool = False) -> None:
        if not 0 < label_top_p < 1:
            raise DataError(f"label_top_p must be in (0, 1), got {label_top_p!r}")
        if tokenizer.pad_token is None:
            raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.base, self.tokenizer = model, tokenizer
        self.template = template or PromptTemplate()
        self.label_top_p, self.r, self.alpha, self.dropout = label_top_p, r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules else None
        self.epochs, self.lr, self.batch_size, self.max_length = epochs, lr, batch_size, max_length
        self.seed, self.progress = seed, progress
        self.model: nn.Module | None = None

    def _classifier(self) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification

        if isinstance(self.base, str):
            clf = AutoModelForSequenceClassification.from_pretrained(self.base, num_labels=1)
        else:
            config = self.base.config.__class__.from_dict(self.base.config.to_dict())
            config.num_labels = 1
            config.pad_token_id = self.tokenizer.pad_token_id
            clf = AutoModelForSequenceClassification.from_config(config)
            missing = clf.load_state_dict(self.base.state_dict(), strict=False)
            body = [k for k in clf.state_dict() if k not in missing.missing_keys]
            if not body:
                raise DataError("the causal LM's weights do not fit the sequence classifier of its architecture")
        clf.config.pad_token_id = self.tokenizer.pad_token_id
        conv1d = type(clf).__name__.startswith("GPT2")  # GPT-2's Conv1D stores weights transposed
        lora = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type="SEQ_CLS",
                          target_modules=self.target_modules, fan_in_fan_out=conv1d)
        return get_peft_model(clf, lora)

    def _logits(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        device = next(self.model.parameters()).device
        return self.model(input_ids=enc["input_ids"].to(device),
                          attention_mask=enc["attention_mask"].to(device)).logits.squeeze(-1).float()

    def fit(self, records: Sequence[Mapping[str, Any]], y: np.ndarray) -> LoraSelector:
        y = np.asarray(y, np.float64).reshape(-1)
        if len(records) != y.shape[0]:
            raise DataError(f"{len(records)} records but {y.shape[0]} scores")
        keep = np.flatnonzero(~np.isnan(y))
        texts = _texts([records[i] for i in keep], self.template)
        labels = torch.tensor(_top_labels(y[keep], self.label_top_p), dtype=torch.float32)
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            self.model = self._classifier()
        finally:
            torch.random.set_rng_state(state)
        gen = torch.Generator().manual_seed(self.seed)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr)
        pos = float(labels.mean())
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - pos) / max(pos, 1e-6)))
        self.model.train()
        for _ in tqdm(range(self.epochs), desc="logix lora selector", disable=not self.progress):
            for batch in torch.randperm(len(texts), generator=gen).split(self.batch_size):
                opt.zero_grad()
                logits = self._logits([texts[i] for i in batch])
                loss_fn(logits, labels[batch].to(logits.device)).backward()
                opt.step()
        self.model.eval()
        return self

    @torch.no_grad()
    def predict(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Log-odds of the top class for every record (one forward pass each, batched)."""
        if self.model is None:
            raise DataError("fit the selector before predict()")
        texts = _texts(records, self.template)
        out = [self._logits(texts[i:i + self.batch_size]).cpu() for i in range(0, len(texts), self.batch_size)]
        return torch.cat(out).double().numpy()

    def evaluate(self, records: Sequence[Mapping[str, Any]], y: np.ndarray, *, holdout: float = 0.2,
                 seed: int | None = None) -> SelectorReport:
        return _holdout(self, list(records), y, holdout, self.seed if seed is None else seed, self.label_top_p)


# ---- the whole recipe ----------------------------------------------------------------------------
@dataclass
class SelectorResult:
    """Predictions for every pool item and the selector's held-out report."""

    ids: list
    predictions: np.ndarray
    report: SelectorReport


def fit_selector(
    selector: Selector | LoraSelector,
    ids: Sequence,
    features: np.ndarray | Sequence[Mapping[str, Any]],
    scores: Mapping[Any, float],
    *,
    holdout: float = 0.2,
) -> SelectorResult:
    """Evaluate on a held-out part of the scored sample, refit on all of it, predict every item.

    Args:
        selector: A :class:`Selector` (``features`` = embeddings aligned with ``ids``) or a
            :class:`LoraSelector` (``features`` = records aligned with ``ids``).
        ids: Every pool id.
        features: Embeddings or records of every pool item.
        scores: True scores of the scored sample, by id (ids not in the pool are an error).
        holdout: Fraction of the scored sample held out for the report.
    """
    where = {key: i for i, key in enumerate(ids)}
    unknown = [k for k in scores if k not in where]
    if unknown:
        raise DataError(f"{len(unknown)} scored id(s) are not in the pool, e.g. {unknown[0]!r}")
    rows = np.array([where[k] for k in scores], dtype=np.int64)
    y = np.array(list(scores.values()), dtype=np.float64)
    sample = _take(features, rows)
    report = selector.evaluate(sample, y, holdout=holdout)
    selector.fit(sample, y)
    return SelectorResult(list(ids), np.asarray(selector.predict(features), np.float64), report)

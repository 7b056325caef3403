"""An influence result as pandas objects (``InfluenceResult.to_pandas()`` and friends).

* :func:`influence_frame`: the tidy (long) frame, one row per (query, kind, rank): ``query_id``,
  ``kind`` (``proponent`` / ``opponent``), ``rank`` (1 = the strongest of its kind: the largest
  score for proponents, the most negative for opponents), ``train_id``, ``score`` and, when known,
  ``query_index`` / ``train_index`` (row positions) and texts.
* :func:`score_matrix_frame`: the dense ``n_query x n_train`` matrix, when the result has one on
  disk (``scores_path``), indexed by query id with one column per train id.
* :func:`self_influence_series`: self-influence indexed by train id.

pandas is optional (``pip install 'logix-attribution[pandas]'``); it is imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from logix.errors import LogixError
from logix.store.scores import read_score_matrix

PROPONENT, OPPONENT = "proponent", "opponent"
KINDS = (PROPONENT, OPPONENT)

Texts = Mapping[Any, str] | Sequence[str] | None


def require_pandas() -> Any:
    """The pandas module, or an ImportError saying how to install it."""
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(
            "InfluenceResult.to_pandas() needs pandas: pip install 'logix-attribution[pandas]' "
            "(or pip install pandas)."
        ) from exc
    return pandas


def _text_of(texts: Texts, ids: Sequence) -> Any:
    """``id -> text`` from a mapping, or from a sequence aligned with ``ids``."""
    if texts is None:
        return None
    if isinstance(texts, Mapping):
        return texts.get
    if len(texts) != len(ids):
        raise LogixError(f"{len(texts)} texts for {len(ids)} ids: pass a sequence aligned with the ids, "
                         "or a mapping id -> text.")
    by_id = dict(zip(ids, texts))
    return by_id.get


def influence_frame(result: Any, train_texts: Texts = None, query_texts: Texts = None) -> Any:
    """The top-k proponents and opponents of every query, one row each (see the module doc).

    Rows come query by query (in ``result.query_ids`` order), proponents before opponents, each
    by rank. ``score`` is float64; ``kind`` is categorical; ``query_index`` is the query's
    position and ``train_index`` the train row's position in ``result.train_ids`` (present when
    the result records it). ``train_texts`` / ``query_texts``: a mapping id -> text or a sequence
    aligned with ``result.train_ids`` / ``result.query_ids``; they add ``train_text`` /
    ``query_text`` columns (``None`` where an id has no text).
    """
    pd = require_pandas()
    sides = [(PROPONENT, result.top_ids, result.top_scores, result.top_index),
             (OPPONENT, result.bottom_ids, result.bottom_scores, result.bottom_index)]
    with_index = all(side[3] is not None for side in sides)
    columns: dict[str, list] = {name: [] for name in ("query_index", "query_id", "kind", "rank", "train_id",
                                                       "train_index", "score")}
    for q, qid in enumerate(result.query_ids):
        for kind, ids, scores, index in sides:
            row_ids = list(ids[q])
            n = len(row_ids)
            columns["query_index"] += [q] * n
            columns["query_id"] += [qid] * n
            columns["kind"] += [kind] * n
            columns["rank"] += list(range(1, n + 1))
            columns["train_id"] += row_ids
            columns["score"] += np.asarray(scores[q], np.float64)[:n].tolist()
            if with_index:
                columns["train_index"] += [int(i) for i in index[q][:n].tolist()]
    if not with_index:
        del columns["train_index"]
    frame = pd.DataFrame(columns)
    frame["kind"] = pd.Categorical(frame["kind"], categories=list(KINDS))
    frame["rank"] = frame["rank"].astype(np.int64)
    frame["score"] = frame["score"].astype(np.float64)
    query_text = _text_of(query_texts, result.query_ids)
    if query_text is not None:
        frame.insert(frame.columns.get_loc("query_id") + 1, "query_text", [query_text(i) for i in frame["query_id"]])
    train_text = _text_of(train_texts, result.train_ids)
    if train_text is not None:
        frame.insert(frame.columns.get_loc("train_id") + 1, "train_text", [train_text(i) for i in frame["train_id"]])
    return frame


def score_matrix_frame(result: Any) -> Any:
    """The full score matrix as a DataFrame: index = query ids, columns = train ids.

    Raises:
        LogixError: the result holds no matrix (score with ``scores_path=``, or ``logix
            influence --save-scores``), or the matrix does not cover every train id.
    """
    pd = require_pandas()
    path = result.scores_path
    if path is None or not path.exists():
        raise LogixError(
            "This result has no score matrix: only the top-k lists are kept. Score with "
            "compute_influence(..., scores_path='scores.h5') / influence(..., scores_path=...) to keep it."
            if path is None else f"The score matrix {path} is gone (moved or deleted since scoring)."
        )
    matrix = read_score_matrix(path)
    if matrix is None or matrix.shape != (len(result.query_ids), len(result.train_ids)):
        shape = None if matrix is None else matrix.shape
        raise LogixError(f"{path} holds a score matrix of shape {shape}, not (n_query, n_train) = "
                         f"({len(result.query_ids)}, {len(result.train_ids)}): it does not belong to this result.")
    return pd.DataFrame(matrix, index=pd.Index(result.query_ids, name="query_id"),
                        columns=pd.Index(result.train_ids, name="train_id"), copy=False)


def self_influence_series(result: Any) -> Any:
    """Self-influence as a float64 Series indexed by train id (named ``self_influence``).

    Raises:
        LogixError: the result holds no self-influence (scored with ``self_influence=False``).
    """
    pd = require_pandas()
    if result.self_influence is None:
        raise LogixError("This result holds no self-influence: score with self_influence=True.")
    values = result.self_influence.detach().cpu().double().numpy()
    return pd.Series(values, index=pd.Index(result.train_ids, name="train_id"), name="self_influence")

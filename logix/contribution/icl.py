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

Modules: :mod:`~logix.contribution.assessment` (the assessment set),
:mod:`~logix.contribution.icl_plan` (ids, segments, controls), :mod:`~logix.contribution.lm_cache`
(the prefix-cached likelihoods), :mod:`~logix.contribution.icl_logs` (the logs and
:func:`~logix.contribution.icl_logs.load_icl_scores`), :mod:`~logix.contribution.icl_result`
(:class:`~logix.contribution.icl_result.IclResult`); this one runs the pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from logix.config.choices import ChoiceEnum, IclControl
from logix.contribution.icl_logs import check_meta, open_writer, pass_meta, submit_rows, write_rows
from logix.contribution.icl_plan import ID_SEP, SEPARATOR, Plan, build_plan
from logix.contribution.icl_result import IclResult
from logix.contribution.lm import Bos, BosChoice, response_nll_ids
from logix.contribution.lm_cache import cached_response_nll
from logix.core.progress import progress_bar
from logix.data.template import PromptTemplate
from logix.errors import DataError
from logix.store.records import committed_rows
from logix.store.rundir import ICL_PAIRS_STORE, ICL_PROBES_STORE, icl_dir, icl_meta_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IclMethod", "icl_contribution"]


class IclMethod(ChoiceEnum):
    """How the pass computes the likelihoods; all give the same numbers."""

    CACHED = "cached"  # the demonstration's KV cache expanded over batches of probes (the default)
    BATCHED = "batched"  # full sequences in batches
    REFERENCE = "reference"  # one full sequence at a time


def icl_contribution(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    candidates: Sequence[Mapping[str, Any]],
    probes: Sequence[Mapping[str, Any]],
    *,
    template: PromptTemplate | None = None,
    control: IclControl | str = IclControl.CHARS,
    seed: int = 0,
    batch_size: int = 8,
    separator: str = SEPARATOR,
    max_length: int | None = None,
    bos: Bos = BosChoice.AUTO,
    run_dir: str | Path | None = None,
    overwrite: bool = False,
    commit_every: int = 1024,
    method: IclMethod | str = IclMethod.CACHED,
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
        progress: Show a progress bar over candidates (stderr).

    Returns:
        The :class:`IclResult` (equal to :func:`load_icl_scores` of ``run_dir`` afterwards).

    Raises:
        DataError: Bad records or options (empty responses, duplicate ids, probes too long).
        RunDirectoryError: ``run_dir`` holds a pass with other settings or other ids.
    """
    try:
        method = IclMethod(method)
    except ValueError:
        raise DataError(f"method must be 'cached', 'batched' or 'reference', got {method!r}") from None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(commit_every, bool) or not isinstance(commit_every, int) or commit_every < 1:
        raise DataError(f"commit_every must be a positive integer, got {commit_every!r}")
    template = PromptTemplate() if template is None else template
    plan = build_plan(model, tokenizer, candidates, probes, template, control, seed, separator, max_length, bos,
                      id_field)
    control = IclControl(control)  # valid: the plan checked it
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    n_c, n_p = len(plan.cand_ids), len(plan.probe_ids)

    done_probes: dict[str, np.ndarray] = {}
    done_pairs: dict[str, np.ndarray] = {}
    logs = None if run_dir is None else icl_dir(run_dir)
    if logs is not None:
        check_meta(icl_meta_file(run_dir), pass_meta(plan, model, tokenizer, template, control.value, seed, separator),
                   overwrite)
        done_probes = committed_rows(logs / ICL_PROBES_STORE)
        done_pairs = committed_rows(logs / ICL_PAIRS_STORE)

    was_training = model.training
    model.eval()
    try:
        # P0 per probe
        todo = [i for i, p in enumerate(plan.probe_ids) if p not in done_probes]
        if todo:
            nll, cnt = response_nll_ids(model, [plan.x[i] for i in todo], [plan.y[i] for i in todo], bos=plan.bos,
                                        batch_size=1 if method is IclMethod.REFERENCE else batch_size, pad_token_id=pad)
            new = {plan.probe_ids[i]: np.array([a, b], dtype=np.float64) for i, a, b in zip(todo, nll, cnt)}
            if logs is not None:
                write_rows(logs / ICL_PROBES_STORE, 2, new)
            done_probes.update(new)
        p0 = np.array([done_probes[p] for p in plan.probe_ids])

        # PT and PR per pair
        writer = open_writer(logs / ICL_PAIRS_STORE, 4) if logs is not None else None
        buffer: dict[str, np.ndarray] = {}
        try:
            for j in progress_bar(range(n_c), enabled=progress, desc="in-context contribution", unit="cand"):
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
                    submit_rows(writer, buffer)
                    buffer = {}
            if writer is not None:
                if buffer:
                    submit_rows(writer, buffer)
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
        control=control.value,
    )



def _score_prefix(
    model: torch.nn.Module,
    plan: Plan,
    segment: list[int],
    probes: list[int],
    method: IclMethod,
    batch_size: int,
    pad: int,
) -> tuple[np.ndarray, np.ndarray]:
    xs = [plan.x[i] for i in probes]
    ys = [plan.y[i] for i in probes]
    if method is IclMethod.CACHED:
        return cached_response_nll(model, plan.bos + segment, xs, ys, batch_size=batch_size, pad_token_id=pad)
    prefixes = [segment + x for x in xs]
    size = 1 if method is IclMethod.REFERENCE else batch_size
    return response_nll_ids(model, prefixes, ys, bos=plan.bos, batch_size=size, max_length=None, pad_token_id=pad)

"""Instruction-data contribution: which instruction samples are worth training on.

Scores (higher = more worth training on, see docs/contribution.md):

* :func:`icl_contribution` — in-context contribution (gradient-free, ICon/RICo-style): how much a
  candidate, shown as a demonstration, lowers the perplexity of probe responses, against a random
  control of the same length.
* :func:`less_scores` — LESS: lr-weighted cosine of a candidate's Adam-preconditioned LoRA
  gradient with the validation subtasks' gradients, from logix logs of a warm-up run.
* :func:`ifd_scores` — instruction-following difficulty ``s(A|Q) / s(A)``.
* :func:`response_length`, :func:`random_scores` — baselines.

Scaling and selection: :func:`embed_records` + :class:`Selector` / :class:`LoraSelector`
(:func:`fit_selector`) learn a score from a sample and score a whole pool in one pass;
:func:`select` + :func:`export_selection` pick the top and write it in the input's format with a
summary beside the baselines. :class:`ContributionJob` (``logix contribute``) does all of it from a
config.
"""

from logix.contribution.baselines import random_scores, response_length
from logix.contribution.embeddings import embed_records
from logix.contribution.ifd import IfdResult, ifd_scores
from logix.contribution.lora_selector import LoraSelector
from logix.contribution.methods import MethodInputs, MethodSpec, register_method
from logix.contribution.pool import Pool, load_pool, record_id, record_ids, write_records
from logix.contribution.scores import ScoreTable
from logix.contribution.selection import Selection, export_selection, format_summary, select
from logix.contribution.selector import Selector, SelectorResult, fit_selector
from logix.contribution.selector_heads import register_head
from logix.contribution.selector_report import SelectorReport, auc

_LAZY = {
    "icl_contribution": "logix.contribution.icl",
    "assessment_set": "logix.contribution.assessment",
    "load_icl_scores": "logix.contribution.icl_logs",
    "IclResult": "logix.contribution.icl_result",
    "sigmoid_map": "logix.contribution.icl_result",
    "less_scores": "logix.contribution.less",
    "LessResult": "logix.contribution.less",
    "warmup_and_log": "logix.contribution.less_warmup",
    "less_callback": "logix.contribution.less_warmup",
    "response_nll": "logix.contribution.lm",
    "ContributionJob": "logix.jobs.contribution",
    "ContributionResult": "logix.jobs.contribution",
}


def __getattr__(name: str):
    """Heavier scorers load on first use (``from logix.contribution import icl_contribution`` works)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'logix.contribution' has no attribute {name!r}")


__all__ = [
    "IfdResult",
    "LoraSelector",
    "MethodInputs",
    "MethodSpec",
    "Pool",
    "ScoreTable",
    "Selection",
    "Selector",
    "SelectorReport",
    "SelectorResult",
    "auc",
    "embed_records",
    "export_selection",
    "fit_selector",
    "format_summary",
    "ifd_scores",
    "load_pool",
    "random_scores",
    "record_id",
    "record_ids",
    "register_head",
    "register_method",
    "response_length",
    "select",
    "write_records",
    *_LAZY,
]

"""The contribution methods of ``logix contribute``: a registry keyed by :class:`ContributionMethod`.

Each method scores the candidates of a :class:`MethodInputs` and adds its columns to the score
table: the model-based ``icl`` and ``ifd`` score the sample, ``less`` every candidate (it is linear
in the pool; its LoRA warm-up changes the model, so it runs after the selector); the ``length``
and ``random`` baselines score every candidate and are always computed.
``register_method(ContributionMethod.X, spec)`` adds one (a method is registered once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logix.config import Config
from logix.config.choices import ContributionMethod, ScoreColumn
from logix.contribution.scores import ScoreTable
from logix.errors import ConfigError
from logix.store.rundir import LESS_DIR


@dataclass
class MethodInputs:
    """What a method scores, and where: candidates and probes are records carrying their pool id
    under ``config.data.id_field``; ``sample`` is the part of the candidates model-based scores cover.

    Attributes:
        model: The causal LM.
        tokenizer: Its tokenizer.
        config: The job's config.
        sample: The candidates the model-based scores cover (the selector learns from them).
        candidates: Every candidate of the pool.
        probes: The assessment probes (in-context contribution).
        table: The score table the method adds its columns to.
        run_dir: The project directory (where a method keeps its logs).
        progress: Show progress bars.
    """

    model: Any
    tokenizer: Any
    config: Config
    sample: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    probes: list[dict[str, Any]]
    table: ScoreTable
    run_dir: Path
    progress: bool = True

    @property
    def max_length(self) -> int | None:
        return self.config.contribution.max_length or None


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        score: adds the method's columns to ``inputs.table``.
        uses_model: a model-based score (the default ``select_by``); ``False``: a baseline, computed
            for every candidate whatever ``contribution.methods`` says.
        after_selector: it changes the model (LESS's LoRA warm-up): it runs after the selector, which
            cannot learn it.
        columns: the other columns it adds besides its own name (selectable with ``select_by``).
    """

    score: Callable[[MethodInputs], None]
    uses_model: bool = True
    after_selector: bool = False
    columns: tuple[ScoreColumn, ...] = ()


_REGISTRY: dict[ContributionMethod, MethodSpec] = {}


def register_method(method: ContributionMethod, spec: MethodSpec) -> None:
    """Register how ``method`` scores.

    Args:
        method: The method's name.
        spec: How it scores, and when it runs.

    Raises:
        ValueError: ``method`` is registered already (a method may be registered once).
    """
    if method in _REGISTRY:
        raise ValueError(f"A contribution method {method.value!r} is already registered.")
    _REGISTRY[method] = spec


def method_spec(method: ContributionMethod) -> MethodSpec:
    """The spec registered for ``method`` (KeyError when none is)."""
    return _REGISTRY[method]


def baselines() -> list[ContributionMethod]:
    """The methods computed for every candidate whatever the config says, in registration order."""
    return [m for m, spec in _REGISTRY.items() if not spec.uses_model]


def selectable(methods: list[ContributionMethod]) -> tuple[str, ...]:
    """Every column ``select_by`` may name when ``methods`` are computed."""
    extra = [c for spec in _REGISTRY.values() for c in spec.columns]
    return (*methods, *baselines(), *extra)


def category_key(records: list[dict[str, Any]], config: Config) -> str:
    """The record field of categories, present in every record (for stratified sampling and LESS subtasks)."""
    key = config.data.category_field or "category"
    if not all(key in r for r in records):
        raise ConfigError(f"Stratified sampling needs a category field in every record; {key!r} is missing. "
                          "Set data.category_field, or give contribution.probes.")
    return key


# ---- the methods -----------------------------------------------------------------------------------
def _icl(inputs: MethodInputs) -> None:
    from logix.contribution.icl import icl_contribution

    cc, table = inputs.config.contribution, inputs.table
    res = icl_contribution(inputs.model, inputs.tokenizer, inputs.sample, inputs.probes, control=cc.icl_control,
                           seed=cc.seed, batch_size=cc.batch_size, max_length=inputs.max_length,
                           run_dir=inputs.run_dir, id_field=inputs.config.data.id_field, progress=inputs.progress)
    by_str = {str(i): i for i in table.ids}
    ids = [by_str[i] for i in res.ids]
    table.add_by_id(ContributionMethod.ICL.value, ids, res.score)
    table.add_by_id(ScoreColumn.ICL_SHARE_POSITIVE.value, ids, res.share_positive)
    table.add_by_id(ScoreColumn.ICL_SIGMOID.value, ids, res.sigmoid_score)


def _ifd(inputs: MethodInputs) -> None:
    from logix.contribution.ifd import ifd_scores

    key = inputs.config.data.id_field
    res = ifd_scores(inputs.model, inputs.tokenizer, inputs.sample, batch_size=inputs.config.contribution.batch_size,
                     max_length=inputs.max_length, progress=inputs.progress)
    inputs.table.add_by_id(ContributionMethod.IFD.value, [r[key] for r in inputs.sample], res.ifd)


def _less(inputs: MethodInputs) -> None:
    from logix.contribution.less import less_scores
    from logix.contribution.less_warmup import warmup_and_log
    from logix.data import InstructionDataset, PadCollator
    from logix.integrations.models import with_lora

    config, model, tokenizer = inputs.config, inputs.model, inputs.tokenizer
    cc, dc = config.contribution, config.data
    if not hasattr(model, "peft_config"):
        lora = dataclasses.replace(config.model.lora, enabled=True)
        model = with_lora(model, config.replace(model=dataclasses.replace(config.model, lora=lora)))
    key = category_key(inputs.probes, config)
    tasks: dict[str, list] = {}
    for p in inputs.probes:
        tasks.setdefault(str(p[key]), []).append(p)
    collator = PadCollator(tokenizer.pad_token_id)
    dataset = InstructionDataset(inputs.candidates, tokenizer, dc.max_length, train_on=dc.train_on, id_field=dc.id_field)
    validation = {t: InstructionDataset(v, tokenizer, dc.max_length, train_on=dc.train_on, id_field=dc.id_field)
                  for t, v in tasks.items()}
    warm = warmup_and_log(model, dataset, validation, collator, fraction=cc.less_fraction,
                          epochs=cc.less_epochs, lr=config.train.lr,
                          batch_size=config.train.batch_size, config=config, project=LESS_DIR,
                          root=inputs.run_dir, seed=cc.seed, log_batch_size=cc.batch_size, overwrite=False,
                          progress=inputs.progress)
    res = less_scores(warm.project_dir, progress=inputs.progress)
    inputs.table.add_by_id(ContributionMethod.LESS.value, res.train_ids, res.scores.double().numpy())


def _length(inputs: MethodInputs) -> None:
    from logix.contribution.baselines import response_length

    inputs.table.add(ContributionMethod.LENGTH.value, response_length(inputs.candidates, inputs.tokenizer))


def _random(inputs: MethodInputs) -> None:
    from logix.contribution.baselines import random_scores

    inputs.table.add(ContributionMethod.RANDOM.value,
                     random_scores(len(inputs.candidates), inputs.config.contribution.seed))


for _method, _spec in (
    (ContributionMethod.ICL, MethodSpec(_icl, columns=(ScoreColumn.ICL_SHARE_POSITIVE, ScoreColumn.ICL_SIGMOID))),
    (ContributionMethod.IFD, MethodSpec(_ifd)),
    (ContributionMethod.LESS, MethodSpec(_less, after_selector=True)),
    (ContributionMethod.LENGTH, MethodSpec(_length, uses_model=False)),
    (ContributionMethod.RANDOM, MethodSpec(_random, uses_model=False)),
):
    register_method(_method, _spec)

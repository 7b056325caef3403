"""A whole attribution job from one config: model, data, fine-tuning + logging, influence.

What ``logix run CONFIG`` and ``logix extract CONFIG`` do, as functions a script can call::

    job = AttributionJob.from_yaml("configs/quickstart.yaml", overrides=["train.epochs=1"])
    result = job.run()                  # fine-tune with LogixCallback (or extract), then score
    print(result.summary())

The project directory ``<root>/<project>`` receives ``job.yaml`` (the resolved config, so
``logix run <dir>/job.yaml`` replays the job) and ``environment.json`` (library versions),
one run directory per logged checkpoint, and the analysis outputs (``influence.jsonl``,
``self_influence.csv``, optionally ``scores.h5``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from logix.analysis import compute_influence, load_checkpoints
from logix.analysis.influence import InfluenceResult
from logix.analysis.records import category_agreement, write_outputs
from logix.analysis.sharded import sharded_influence
from logix.capture.run import Run
from logix.config import Config, resolve_config
from logix.core.checksum import load_tensors, save_tensors
from logix.core.distributed import Dist
from logix.data import (
    PadCollator,
    absolute_paths,
    build_datasets,
    build_tokenizer,
    dataset_categories,
    dataset_texts,
)
from logix.errors import ConfigError
from logix.integrations.loop import extract
from logix.integrations.models import build_model
from logix.store import Store
from logix.store.format import write_json_atomic
from logix.store.guard import check_project_name, open_directory
from logix.store.rundir import (
    MODEL_RUN,
    QUERY_STORE,
    checkpoints_file,
    environment_file,
    final_model_file,
    job_file,
    scores_file,
    scoring_dir,
    store_dir,
    trainer_dir,
)
from logix.store.runinfo import environment_versions

log = logging.getLogger("logix")


def training_arguments(config: Config, output_dir: Path, progress: bool = True):
    """The ``TrainingArguments`` of ``train`` (nothing else is set behind the user's back)."""
    from transformers import TrainingArguments

    tc = config.train
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=tc.epochs, max_steps=tc.max_steps,
        per_device_train_batch_size=tc.batch_size, gradient_accumulation_steps=tc.grad_accum,
        learning_rate=tc.lr, weight_decay=tc.weight_decay, warmup_steps=tc.warmup_ratio,
        lr_scheduler_type=tc.scheduler, seed=tc.seed, report_to=[], save_strategy="no",
        logging_steps=max(1, tc.batch_size), disable_tqdm=not progress,
        use_cpu=not torch.cuda.is_available(),
    )


# ---- the job ------------------------------------------------------------------------------------
@dataclass
class JobResult:
    """What a job produced: its directory, the checkpoints logged, and the influence scores."""

    dir: Path
    checkpoints: list[str]
    influence: InfluenceResult | None = None
    sanity: dict[str, float] | None = None
    query_texts: dict[Any, str] = field(default_factory=dict)
    train_texts: dict[Any, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self, max_queries: int = 5, max_proponents: int = 3) -> str:
        """Readable text: per query its top proponents with their texts, and the sanity figure."""
        lines = [f"logix job: {self.dir} (checkpoints: {', '.join(self.checkpoints)})"]
        res = self.influence
        if res is not None:
            for q, qid in enumerate(res.query_ids[:max_queries]):
                lines += ["", f"query {qid}: {_short(self.query_texts.get(qid, ''))}"]
                for tid, score in list(zip(res.top_ids[q], res.top_scores[q].tolist()))[:max_proponents]:
                    lines.append(f"  +{score:10.3e}  {tid}: {_short(self.train_texts.get(tid, ''))}")
            if len(res.query_ids) > max_queries:
                lines.append(f"\n... {len(res.query_ids) - max_queries} more queries in influence.jsonl")
        if self.sanity:
            s = self.sanity
            lines += ["", f"sanity: {s['same_category']:.1%} of the top-{int(s['k'])} proponents share the "
                      f"query's category (random: {s['random']:.1%}; {s['ratio']:.1f}x)"]
        return "\n".join(lines)


def _save_weights(model, path: Path) -> None:
    """The fine-tuned weights, checksummed like every tensor file of a project (``logix verify``),
    written atomically: what ``logix query --text`` rebuilds the model from (:func:`load_job_model`)."""
    seen, tensors = set(), {}
    for name, value in model.state_dict().items():  # tied weights: a copy, as safetensors wants
        ptr = value.untyped_storage().data_ptr()
        tensors[name] = value.clone() if ptr in seen else value
        seen.add(ptr)
    tmp = path.with_name(path.name + ".tmp")
    save_tensors(tmp, tensors)
    tmp.replace(path)


def load_job_model(project_dir: Path, weights: Path | None = None):
    """The model of a ``logix run`` / ``logix extract`` project and its tokenizer: built from its
    ``job.yaml``, with ``weights`` (a safetensors file of that model's state dict) or the weights
    ``logix run`` saved (checked against their checksum); an extract project's model is rebuilt as
    it was built. Returns ``(model, tokenizer, config)``."""
    from safetensors.torch import load_model

    config = Config.from_yaml(job_file(project_dir))
    tokenizer = build_tokenizer(config, Path.cwd())
    model = build_model(config, tokenizer)
    if weights is not None:
        load_model(model, str(weights))
    elif final_model_file(project_dir).exists():
        model.load_state_dict(load_tensors(final_model_file(project_dir)))
    return model.to(_device()), tokenizer, config


def _short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


class AttributionJob:
    """Model, data, fine-tuning with logging, and influence, as ``config`` says.

    Args:
        config: the job's config (a :class:`Config`, mapping or YAML path).
        project: directory name under ``config.root`` (default: ``"job"``).
        config_dir: folder that relative data paths may be relative to.
        overwrite: delete an existing project directory first (default: resume it).
        progress: show progress bars.
    """

    def __init__(self, config: Config | dict | str | Path, project: str = "job",
                 config_dir: Path | None = None, overwrite: bool = False, progress: bool = True) -> None:
        self.config = resolve_config(config)
        if config_dir is None and isinstance(config, (str, Path)):
            config_dir = Path(config).resolve().parent
        self.config_dir = config_dir
        self.config = absolute_paths(self.config, config_dir)
        self.project = check_project_name(project)
        self.dir = Path(self.config.root) / project
        self.overwrite = overwrite
        self.progress = progress

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> AttributionJob:
        config = Config.from_yaml(path, overrides)
        return cls(config, config_dir=Path(path).resolve().parent, **kwargs)

    def _prepare_dir(self) -> None:
        Dist.current().on_main(self._prepare_dir_main)  # under torchrun: rank 0 writes, all wait

    def _prepare_dir_main(self) -> None:
        # one job per project at a time; --overwrite deletes only a logix project inside root
        self._lease = open_directory(self.dir, self.config.root, self.overwrite, what="project directory")
        path = job_file(self.dir)
        text = self.config.to_yaml()
        if path.exists() and path.read_text() != text:
            raise ConfigError(
                f"{self.dir} holds a job with another config ({path}). Use another --project, "
                "or --overwrite to delete it."
            )
        path.write_text(text)
        write_json_atomic(environment_file(self.dir), environment_versions())

    def run(self, extract_only: bool = False) -> JobResult:
        """Build everything, log (fine-tuning first unless ``extract_only`` or ``train.enabled``
        is false), then score influence when ``analysis.enabled`` and queries exist."""
        import time

        if self.config.analysis.enabled and self.config.analysis.full_space_run is not None and not extract_only:
            raise ConfigError("analysis.full_space_run (asymmetric preconditioning) applies to `logix influence` "
                              "on finished runs; `logix run` does not log the full-space run. Set it to null here.")
        self._prepare_dir()
        times: dict[str, float] = {}
        start = time.perf_counter()
        tokenizer = build_tokenizer(self.config, self.config_dir)
        train, queries = build_datasets(self.config, tokenizer, self.config_dir)
        model = build_model(self.config, tokenizer)
        times["setup"] = time.perf_counter() - start
        start = time.perf_counter()
        if extract_only or not self.config.train.enabled:
            checkpoints = [self._extract(model, train, queries, tokenizer)]
        else:
            checkpoints = self._fine_tune(model, train, queries, tokenizer)
        times["train_and_log"] = time.perf_counter() - start
        result = JobResult(self.dir, checkpoints, seconds=times)
        if self.config.analysis.enabled and queries is not None and not extract_only:
            start = time.perf_counter()
            self._analyse(result, train, queries)
            times["influence"] = time.perf_counter() - start
        return result

    def _collator(self, tokenizer) -> PadCollator:
        return PadCollator(tokenizer.pad_token_id)

    def _extract(self, model, train, queries, tokenizer) -> str:
        sched = self.config.schedule
        run = Run(f"{self.project}/{MODEL_RUN}", config=self.config)
        extract(run, model.to(_device()), train, self._collator(tokenizer), queries=queries,
                batch_size=sched.batch_size, ids=self.config.data.ids, id_field=self.config.data.id_field,
                limit=sched.max_examples, progress=self.progress)
        entry = {"name": MODEL_RUN, "step": None, "epoch": None, "learning_rate": None, "dir": MODEL_RUN}
        run.dist.on_main(lambda: write_json_atomic(checkpoints_file(self.dir), {"checkpoints": [entry]}))
        return MODEL_RUN

    def _fine_tune(self, model, train, queries, tokenizer) -> list[str]:
        from transformers import Trainer

        from logix.integrations.huggingface import LogixCallback
        from logix.integrations.progress import show_progress

        collator = self._collator(tokenizer)
        callback = LogixCallback(self.config, project=self.project, train_dataset=train, queries=queries,
                                 data_collator=collator, progress=self.progress)
        trainer = Trainer(model=model, args=training_arguments(self.config, trainer_dir(self.dir), self.progress),
                          train_dataset=train, data_collator=collator, callbacks=[callback])
        show_progress(trainer, self.progress).train()  # progress and loss logs on stderr, none with --quiet
        if not callback.checkpoints:
            raise ConfigError("schedule logged no checkpoint: set schedule.at_end, epochs, steps or every_n_steps.")
        Dist.current().on_main(lambda: _save_weights(trainer.model, final_model_file(self.dir)))
        return [c["name"] for c in callback.checkpoints]

    def _analyse(self, result: JobResult, train, queries) -> None:
        ac = self.config.analysis
        cps, entries = load_checkpoints(self.dir, ac.preconditioner, ac.resolved_damping(),
                                        ac.checkpoints.value)
        query_ids = Store(store_dir(self.dir / entries[-1]["dir"], QUERY_STORE)).ids
        dist = Dist.current()
        if dist.active:  # each process scores its parts of the train rows; results merged exactly
            res = sharded_influence(
                cps, scoring_dir(self.dir), query_ids=query_ids, mode=ac.mode, top_k=ac.top_k,
                memory_budget_mb=ac.memory_budget_mb, save_scores=ac.save_scores,
                self_influence=ac.self_influence, progress=self.progress, overwrite=True,
            )
        else:
            res = compute_influence(
                cps, query_ids=query_ids, mode=ac.mode, top_k=ac.top_k, memory_budget_mb=ac.memory_budget_mb,
                scores_path=scores_file(self.dir) if ac.save_scores else None,
                self_influence=ac.self_influence, progress=self.progress,
            )
        result.influence = res
        result.train_texts = dataset_texts(train)
        result.query_texts = dataset_texts(queries)
        result.sanity = category_agreement(res, dataset_categories(train, self.config),
                                           dataset_categories(queries, self.config))
        dist.on_main(lambda: write_outputs(self.dir, res, result.train_texts, result.query_texts, result.sanity))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

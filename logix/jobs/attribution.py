"""A whole attribution job from one config: model, data, fine-tuning + logging, influence.

What ``logix run CONFIG`` and ``logix extract CONFIG`` do, as functions a script can call::

    job = Job.from_yaml("configs/quickstart.yaml", overrides=["train.epochs=1"])
    result = job.run()                  # fine-tune with LogixCallback (or extract), then score
    print(result.summary())

The project directory ``<root>/<project>`` receives ``job.yaml`` (the resolved config, so
``logix run <dir>/job.yaml`` replays the job) and ``environment.json`` (library versions),
one run directory per logged checkpoint, and the analysis outputs (``influence.jsonl``,
``self_influence.csv``, optionally ``scores.h5``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from logix.analysis import CHECKPOINTS_FILE, compute_influence, load_checkpoints
from logix.analysis.influence import InfluenceResult
from logix.analysis.sharded import sharded_influence
from logix.capture.run import Run
from logix.config import Config, DataFormat, ModelArch, resolve_config
from logix.core.distributed import Dist
from logix.data import InstructionDataset, PadCollator, TextDataset, load_jsonl, load_tokenizer
from logix.errors import ConfigError
from logix.integrations.loop import extract
from logix.store import Store
from logix.store.format import write_json_atomic
from logix.store.runinfo import _versions

log = logging.getLogger("logix")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_path(path: str, config_dir: Path | None) -> Path:
    """A data path as given (relative to the cwd), else relative to the config file's folder."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists() or config_dir is None:
        return candidate
    beside = config_dir / candidate
    return beside if beside.exists() else candidate


def absolute_paths(config: Config, config_dir: Path | None) -> Config:
    """The config with its existing local data / tokenizer paths made absolute, so that the
    ``job.yaml`` written beside the outputs replays from any folder."""
    import dataclasses

    def fix(value: str) -> str:
        path = resolve_path(value, config_dir) if value else None
        return str(path.resolve()) if path is not None and path.exists() else value

    data = dataclasses.replace(config.data, train=fix(config.data.train), queries=fix(config.data.queries))
    model = dataclasses.replace(config.model, tokenizer=fix(config.model.tokenizer))
    return config.replace(data=data, model=model)


# ---- building blocks --------------------------------------------------------------------------
def build_tokenizer(config: Config, config_dir: Path | None = None):
    """The tokenizer ``model.tokenizer`` names (a tokenizer.json, a folder or a hub name)."""
    name = config.model.tokenizer or config.model.name
    if not name:
        raise ConfigError("Set model.tokenizer (a tokenizer.json file, a folder or a hub name) or model.name.")
    local = resolve_path(name, config_dir)
    return load_tokenizer(str(local) if local.exists() else name)


def build_model(config: Config, tokenizer) -> nn.Module:
    """``from_pretrained(model.name)``, or ``model.arch`` built from ``arch_config`` with seeded weights;
    wrapped with LoRA adapters when ``model.lora.enabled``."""
    mc = config.model
    dtype = _TORCH_DTYPES[mc.dtype.value]
    if mc.name:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(mc.name, dtype=dtype)
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"The tokenizer has {len(tokenizer)} tokens but {mc.name}'s vocabulary has {vocab}: set "
                f"model.tokenizer to the model's own tokenizer (e.g. model.tokenizer={mc.name})."
            )
    else:
        model = _seeded_model(config, tokenizer).to(dtype)
    if mc.lora.enabled:
        model = _with_lora(model, config)
    return model


def _seeded_model(config: Config, tokenizer) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    mc = config.model
    special = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    kwargs = {**special, **dict(mc.arch_config)}
    torch.manual_seed(mc.seed)
    try:
        if mc.arch is ModelArch.GPT2:
            return GPT2LMHeadModel(GPT2Config(**kwargs))
        return LlamaForCausalLM(LlamaConfig(**kwargs))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.arch_config is not valid for {mc.arch.value}: {exc}") from None


def _with_lora(model: nn.Module, config: Config) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lc = config.model.lora
    targets = list(lc.target_modules) or None
    is_conv1d = type(model).__name__.startswith("GPT2")
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                          task_type="CAUSAL_LM", fan_in_fan_out=is_conv1d)
    return get_peft_model(model, peft_cfg)


def build_datasets(config: Config, tokenizer, config_dir: Path | None = None):
    """``(train, queries)`` datasets (queries ``None`` when ``data.queries`` is empty)."""
    dc = config.data
    if not dc.train:
        raise ConfigError("data.train is empty: name a JSONL file of training records.")
    train = _dataset(resolve_path(dc.train, config_dir), dc.limit_train, config, tokenizer)
    queries = None
    if dc.queries:
        queries = _dataset(resolve_path(dc.queries, config_dir), dc.limit_queries, config, tokenizer)
    return train, queries


def _dataset(path: Path, limit: int, config: Config, tokenizer):
    dc = config.data
    records = load_jsonl(path)
    if limit:
        records = records[:limit]
    if dc.format is DataFormat.TEXT:
        return TextDataset(records, tokenizer, dc.max_length, text_field=dc.text_field,
                           id_field=dc.id_field, ids=dc.ids.value)
    return InstructionDataset(records, tokenizer, dc.max_length, train_on=dc.train_on,
                              id_field=dc.id_field, ids=dc.ids.value)


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


def _short(text: str, width: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


class Job:
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
        self.project = project
        self.dir = Path(self.config.root) / project
        self.overwrite = overwrite
        self.progress = progress

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = (), **kwargs: Any) -> Job:
        config = Config.from_yaml(path, overrides)
        return cls(config, config_dir=Path(path).resolve().parent, **kwargs)

    def _prepare_dir(self) -> None:
        Dist.current().on_main(self._prepare_dir_main)  # under torchrun: rank 0 writes, all wait

    def _prepare_dir_main(self) -> None:
        if self.overwrite and self.dir.exists():
            import shutil

            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        job_file = self.dir / "job.yaml"
        text = self.config.to_yaml()
        if job_file.exists() and job_file.read_text() != text:
            raise ConfigError(
                f"{self.dir} holds a job with another config ({job_file}). Use another --project, "
                "or --overwrite to delete it."
            )
        job_file.write_text(text)
        write_json_atomic(self.dir / "environment.json", _versions())

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
        run = Run(f"{self.project}/model", config=self.config)
        extract(run, model.to(_device()), train, self._collator(tokenizer), queries=queries,
                batch_size=sched.batch_size, ids=self.config.data.ids, id_field=self.config.data.id_field,
                limit=sched.max_examples, progress=self.progress)
        entry = {"name": "model", "step": None, "epoch": None, "learning_rate": None, "dir": "model"}
        run.dist.on_main(lambda: write_json_atomic(self.dir / CHECKPOINTS_FILE, {"checkpoints": [entry]}))
        return "model"

    def _fine_tune(self, model, train, queries, tokenizer) -> list[str]:
        from transformers import Trainer

        from logix.integrations.huggingface import LogixCallback

        collator = self._collator(tokenizer)
        callback = LogixCallback(self.config, project=self.project, train_dataset=train, queries=queries,
                                 data_collator=collator, progress=self.progress)
        trainer = Trainer(model=model, args=training_arguments(self.config, self.dir / "trainer", self.progress),
                          train_dataset=train, data_collator=collator, callbacks=[callback])
        trainer.train()
        if not callback.checkpoints:
            raise ConfigError("schedule logged no checkpoint: set schedule.at_end, epochs, steps or every_n_steps.")
        return [c["name"] for c in callback.checkpoints]

    def _analyse(self, result: JobResult, train, queries) -> None:
        ac = self.config.analysis
        cps, entries = load_checkpoints(self.dir, ac.preconditioner, ac.resolved_damping(),
                                        ac.checkpoints.value)
        query_ids = Store(self.dir / entries[-1]["dir"] / "stores" / "queries").ids
        dist = Dist.current()
        if dist.active:  # each process scores its parts of the train rows; results merged exactly
            res = sharded_influence(
                cps, self.dir / "scoring", query_ids=query_ids, mode=ac.mode, top_k=ac.top_k,
                memory_budget_mb=ac.memory_budget_mb, save_scores=ac.save_scores,
                self_influence=ac.self_influence, progress=self.progress, overwrite=True,
            )
        else:
            res = compute_influence(
                cps, query_ids=query_ids, mode=ac.mode, top_k=ac.top_k, memory_budget_mb=ac.memory_budget_mb,
                scores_path=self.dir / "scores.h5" if ac.save_scores else None,
                self_influence=ac.self_influence, progress=self.progress,
            )
        result.influence = res
        result.train_texts = _texts(train)
        result.query_texts = _texts(queries)
        result.sanity = category_agreement(res, _categories(train, self.config), _categories(queries, self.config))
        dist.on_main(lambda: write_outputs(self.dir, res, result.train_texts, result.query_texts, result.sanity))


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _texts(dataset) -> dict[Any, str]:
    out = {}
    for i, item_id in enumerate(dataset.ids):
        out[item_id] = "".join(dataset.texts(i)) if hasattr(dataset, "texts") else dataset.text(i)
    return out


def _categories(dataset, config: Config) -> dict[Any, Any] | None:
    field_name = config.data.category_field
    records = dataset.records
    if not field_name or not records or any(field_name not in r for r in records):
        return None
    return dict(zip(dataset.ids, (r[field_name] for r in records)))


def category_agreement(result: InfluenceResult, train_cat: dict | None, query_cat: dict | None) -> dict | None:
    """Share of top-k proponents in the query's own category, and what random picks would give.

    Random: for each query, the share of training examples of its category (the expected
    share of a uniformly random top-k), averaged over queries.
    """
    if not train_cat or not query_cat:
        return None
    counts: dict[Any, int] = {}
    for c in train_cat.values():
        counts[c] = counts.get(c, 0) + 1
    hits, total, expected = 0, 0, 0.0
    for qid, top in zip(result.query_ids, result.top_ids):
        category = query_cat.get(qid)
        hits += sum(train_cat.get(t) == category for t in top)
        total += len(top)
        expected += counts.get(category, 0) / len(train_cat)
    same = hits / max(total, 1)
    rand = expected / max(len(result.query_ids), 1)
    return {"same_category": same, "random": rand, "ratio": same / rand if rand else float("inf"),
            "k": float(len(result.top_ids[0]) if result.top_ids else 0)}


def write_outputs(directory: Path, result: InfluenceResult, train_texts: dict, query_texts: dict,
                  sanity: dict | None) -> None:
    """``influence.jsonl`` (per query: proponents and opponents with texts), ``self_influence.csv``,
    ``sanity.json`` and, when the result has per-module scores, ``per_module.json``."""
    with open(directory / "influence.jsonl", "w") as fh:
        for record in result.to_records():
            record["query_text"] = query_texts.get(record["query_id"])
            for key in ("proponents", "opponents"):
                for entry in record[key]:
                    entry["text"] = train_texts.get(entry["id"])
            fh.write(json.dumps(record) + "\n")
    if result.self_influence is not None:
        with open(directory / "self_influence.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "self_influence"])
            for tid, value in zip(result.train_ids, result.self_influence.tolist()):
                writer.writerow([tid, f"{value:.6e}"])
    if sanity is not None:
        write_json_atomic(directory / "sanity.json", sanity)
    if result.per_module:  # compute_influence(per_module=True) / `logix influence --per-module`
        from logix.report.data import per_module_records

        write_json_atomic(directory / "per_module.json", per_module_records(result))

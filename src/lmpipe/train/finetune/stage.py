"""The ``finetune`` stage: instruction tuning, classification and token classification heads on the
pretrained model, with full fine-tuning or LoRA, early stopping on the dev set and exact resume.

Reads ``models/pretrain/`` (or the task's ``init``), ``artifacts/tokenizer/`` (the model's recorded
tokenizer fingerprint must match, else FingerprintMismatch) and each task's data sources (by
default the embedded default's instruction pairs, reviews and entity documents in ``data/split/``).
The base may be a causal LM or, for classification and token classification, a masked-LM encoder
(``pretrain.objective: mlm``, the BERT-style path); instruction tuning from a masked LM is refused
from its config.json before anything else is read. Writes, per task (rank 0, atomically):

- ``models/finetune/<task>/``: ``model.safetensors`` + ``config.json`` (the GPT with any LoRA
  update merged in, the tokenizer fingerprint, the chat template or the classifier's labels and
  pooling), ``head.safetensors`` (classification, token classification), ``adapter/`` (LoRA alone),
  ``eval.json`` (dev history, best step, confusion matrix, entity scores or generated samples) and ``manifest.json``;
- ``metrics/finetune_<task>.json`` for DVC (for SFT with the generated answer to a held-out prompt);
- ``plots/finetune/<task>/`` (one directory per task, replaced whole): ``dev.csv`` (dev metrics at
  each evaluation) and, for classification, ``confusion.png`` and ``predictions.csv`` (actual,
  predicted per dev example: DVC's confusion template);
- checkpoints in ``checkpoints/finetune/<task>/<run key>/``; a rerun of the same task, config,
  base model and data resumes from the newest complete one.

MLflow: the CLI's run for the stage; every key, text and artifact is prefixed with the task's name
(``sft/dev/loss``, ``cls/eval.json``), so one run can hold several tasks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lmpipe import tracking
from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.io import (
    atomic_dir,
    fingerprint_path,
    write_bytes,
    write_json,
    write_manifest,
)
from lmpipe.model.classifier import HEAD_FILE, ClassificationModel, TokenClassificationModel, head_bytes
from lmpipe.model.gpt import GPT, GPTConfig, estimate_flops_per_token
from lmpipe.model.io import (
    ExpectedTokenizer,
    is_masked_lm,
    load_model,
    read_model_config,
    refuse_masked_lm,
    save_model,
)
from lmpipe.tokenizer.train import TokenizerInfo, load_tokenizer
from lmpipe.tracking import StageTracker
from lmpipe.train.callbacks import DevEvaluation, TaskAsyncTracker, TrainingMonitor
from lmpipe.train.checkpoint import ResumePoint
from lmpipe.train.finetune import classify, sft, tagging
from lmpipe.train.finetune.config import (
    ClassificationTask,
    DataSource,
    FilesData,
    FinetuneConfig,
    SFTTask,
    SplitData,
    TokenClassificationTask,
)
from lmpipe.train.finetune.data import Batch, TrainBatches, eval_batches
from lmpipe.train.loop import Run
from lmpipe.train.loop import fit as fit_run
from lmpipe.train.lora import apply_lora, merge, parameter_counts, save_adapter
from lmpipe.train.module import TrainModule
from lmpipe.train.objectives import Objective
from lmpipe.train.settings import run_key

log = logging.getLogger(__name__)

Task = SFTTask | ClassificationTask | TokenClassificationTask


def run(cfg: FinetuneConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe finetune``: every task in turn; keys of the summary are prefixed
    with the task's name. See the module docstring for inputs and outputs."""
    summary: dict[str, Any] = {"artifacts": []}
    for name in cfg.tasks:
        summary.update(run_task(cfg, name, paths))
    return summary


def run_task(cfg: FinetuneConfig, task_name: str, paths: Paths, *, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fine-tune one task (``lmpipe finetune --task NAME``, DVC stage ``finetune@NAME``).

    ``callbacks`` run after the stage's own. Raises ConfigError for an unknown task or impossible
    settings, FingerprintMismatch when the base model was trained with another tokenizer,
    DataError for bad input rows (naming file and line), TrainingDiverged on a non-finite loss.
    """
    task = cfg.tasks.get(task_name)
    if task is None:
        raise ConfigError(f"finetune.tasks: no task named {task_name!r} (tasks: {', '.join(cfg.tasks) or 'none'})")
    init_dir = paths.root / task.init
    check_base(task, task_name, init_dir)
    sp, info = load_tokenizer(paths.tokenizer)
    base = load_base(init_dir, info)
    block = base.config.block_size
    if task.max_length is not None and task.max_length > block:
        raise ConfigError(f"finetune.tasks.{task_name}.max_length: {task.max_length} exceeds the model's "
                          f"block_size {block}")
    L.seed_everything(task.seed, verbose=False)  # head and adapter init
    if isinstance(task, SFTTask):
        prepared = prepare_sft(task, paths, base, sp, info, task.max_length or block)
    elif isinstance(task, TokenClassificationTask):
        prepared = prepare_token_classification(task, paths, base, sp, info, task.max_length or block)
    else:
        prepared = prepare_classification(task, paths, base, sp, info, task.max_length or block)
    model = prepared.model.train()  # load_model returns eval mode; dropout must be live while training
    if task.method == "lora":
        model = apply_lora(model, task.lora, modules_to_save=prepared.modules_to_save,
                           where=f"finetune.tasks.{task_name}.lora.target_modules")
    key = run_key(task, base=fingerprint_path(init_dir), data=prepared.data_fingerprint)
    fitted = fit(task, task_name, model, prepared, paths.checkpoints / "finetune" / task_name / key, key, callbacks)
    if fitted is None:  # not rank 0: rank 0 exports
        return {}
    export = Export(task_name, task, paths, init_dir, info, key, fitted.numbers, fitted.evaluation.history)
    with atomic_dir(export.directory) as tmp:
        if task.method == "lora" and task.lora.save_adapter:
            save_adapter(model, tmp / "adapter")  # type: ignore[arg-type]
        prepared.finish(merge(model).to(fitted.device).eval(), export, tmp)
    return export.finish()


@dataclass
class Fitted:
    evaluation: DevEvaluation
    numbers: dict[str, Any]
    device: torch.device


def fit(task: Task, task_name: str, model: nn.Module, prepared: Prepared, ckpt_dir: Path, key: str,
        callbacks: Sequence[Callback]) -> Fitted | None:
    """Train ``model`` in the one loop (resuming from ``ckpt_dir`` when a checkpoint of run ``key``
    is there), then load the best dev evaluation's weights into it. None on ranks other than 0."""
    tracker = TaskAsyncTracker(tracking.active(), task_name)
    mean_length = int(np.mean([len(e.ids) for e in prepared.train]))
    counts = parameter_counts(model)

    def evaluation(monitor: TrainingMonitor) -> list[Callback]:
        return [DevEvaluation(
            every=task.eval_every, objective=prepared.objective, patience=task.patience, min_delta=task.min_delta,
            tracker=tracker, batches=lambda rank, world: eval_batches(prepared.dev, prepared.collate,
                                                                       task.eval_batch_size, rank, world))]

    def start(trainer: L.Trainer, resume: ResumePoint | None) -> TrainModule:
        data = TrainBatches(prepared.train, prepared.collate, micro_batch_size=task.micro_batch_size,
                            accumulation=task.accumulation, max_steps=task.max_steps, seed=task.seed)
        if trainer.is_global_zero:
            log.info("finetune %s (%s, %s): %d train / %d dev examples, %s of %s parameters trainable, run %s",
                     task_name, task.type, task.method, len(prepared.train), len(prepared.dev),
                     f"{counts['trainable_parameters']:,}", f"{counts['total_parameters']:,}", key)
            tracker.log_params({"resolved": {**counts, **prepared.counts, "run_key": key,
                                             "precision": str(trainer.precision), "world_size": trainer.world_size}})
        return TrainModule(model, prepared.objective, task, seed=task.seed, run_key=key,
                           accumulation=task.accumulation, data=data)

    fitted = fit_run(Run(
        label=f"finetune {task_name}", settings=task, checkpoint_dir=ckpt_dir, key=key, tracker=tracker, start=start,
        evaluation=evaluation, also_at=(task.eval_every,), extra_callbacks=callbacks,
        flops_per_token=estimate_flops_per_token(prepared.gpt_config, mean_length),
    ))
    if not fitted.trainer.is_global_zero:
        return None
    dev = fitted.callbacks[0]
    assert isinstance(dev, DevEvaluation)
    dev.restore_best(model)
    numbers: dict[str, Any] = {
        **fitted.summary, "best_step": int(dev.best["step"]) if dev.best else 0,
        "stopped_early": int(dev.stopped), **counts, **prepared.counts,
    }
    if dev.history:
        name = prepared.objective.monitor
        numbers[f"dev_{name}_initial"] = dev.history[0][name]
    return Fitted(dev, numbers, fitted.trainer.strategy.root_device)


# ------------------------------------------------------------------------------ preparation


@dataclass
class Prepared:
    """A task made ready to train: model (before LoRA), objective, tokenized data, and how to
    evaluate and write the final model."""

    model: nn.Module
    objective: Objective
    collate: Callable[[list[Any]], Batch]
    train: list[Any]
    dev: list[Any]
    finish: Callable[[nn.Module, Export, Path], None]
    gpt_config: GPTConfig
    counts: dict[str, int] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    data_fingerprint: str = ""


def check_base(task: Task, task_name: str, init_dir: Path) -> None:
    """Refuse a base model the task cannot start from, from its config.json alone (before any data
    or weight is read): a masked LM for a task that needs next-token predictions, and ``pooling:
    first`` on a causal model, whose first token has seen only itself. Raises ConfigError, or
    DataError when ``init_dir`` holds no model."""
    config = read_model_config(init_dir)
    if task.needs_causal_lm:
        refuse_masked_lm(config, init_dir, f"finetune.tasks.{task_name}.init", task.uses)
    if getattr(task, "pooling", None) == "first" and not is_masked_lm(config):
        raise ConfigError(f"finetune.tasks.{task_name}.pooling: 'first' pools the first token, which in the causal "
                          f"model {init_dir} has seen only itself; use last or mean (first is for masked-LM bases)")


def load_base(init_dir: Path, info: TokenizerInfo) -> GPT:
    """Load the model to fine-tune (causal or masked LM) after checking it was trained with this
    tokenizer. Raises FingerprintMismatch on another tokenizer, DataError for a missing or broken
    model directory."""
    model, _ = load_model(init_dir, tokenizer=ExpectedTokenizer(
        info.fingerprint, str(info.directory),
        "re-run pretrain (dvc repro) with this tokenizer, or point init at a model trained with it"))
    return model


def digest(arrays: Iterable[np.ndarray]) -> str:
    """sha256 over a sequence of arrays (shape and bytes of each): the fingerprint of the data."""
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(str(array.shape).encode())
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def prepare_sft(task: SFTTask, paths: Paths, base: GPT, sp: Any, info: TokenizerInfo, max_length: int) -> Prepared:
    template = sft.ChatTemplate.from_tokenizer(sp, info)
    train, train_counts = sft.build_examples(sft.read_conversations(task.train_data, paths, task.system_prompt),
                                             template, max_length)
    dev, dev_counts = sft.build_examples(sft.read_conversations(task.dev_data, paths, task.system_prompt),
                                         template, max_length)
    samples: list[tuple[list[sft.Message], str]] = []
    if task.sample_count:
        source = task.sample_data if task.sample_data is not None else task.dev_data
        samples = sft.held_out_prompts(sft.read_conversations(source, paths, task.system_prompt), task.sample_count)
    objective = sft.SFTObjective(task.monitor)
    collate = sft.SFTCollate(info.pad_id)

    def finish(model: nn.Module, export: Export, tmp: Path) -> None:
        assert isinstance(model, GPT)
        final = evaluate(model, objective, eval_batches(dev, collate, task.eval_batch_size))
        export.numbers.update({f"dev_{k}": v for k, v in final.items()})
        answers = [{"prompt": "\n".join(f"{m.role}: {m.content}" for m in prompt), "reference": reference,
                    "generated": sft.generate_reply(model, template, prompt, task.max_new_tokens, model.wte.weight.device)}
                   for prompt, reference in samples]
        export.details["samples"] = answers
        if answers:
            export.metrics_extra["sample"] = answers[0]
            export.tables["samples.json"] = answers
            log.info("held-out prompt answered:\n%s", "\n\n".join(
                f"--- prompt\n{a['prompt']}\n--- reference\n{a['reference']}\n--- generated\n{a['generated']}"
                for a in answers))
        export.save(model, tmp, {"chat_template": template.describe()})

    return Prepared(
        model=base, objective=objective, collate=collate, train=train, dev=dev, finish=finish, gpt_config=base.config,
        counts={"train_examples": len(train), "dev_examples": len(dev), "train_truncated": train_counts["truncated"],
                "train_dropped": train_counts["dropped"], "dev_truncated": dev_counts["truncated"]},
        data_fingerprint=digest(a for e in [*train, *dev] for a in (e.ids, e.trained)),
    )


def prepare_classification(task: ClassificationTask, paths: Paths, base: GPT, sp: Any, info: TokenizerInfo,
                           max_length: int) -> Prepared:
    train_items = classify.read_labelled(task.train_data, paths)
    labels = classify.resolve_labels(train_items, task.labels)
    encoder = classify.TextEncoder(sp, info.eos_id, max_length)
    train = classify.build_examples(train_items, labels, encoder)
    dev = classify.build_examples(classify.read_labelled(task.dev_data, paths), labels, encoder)
    test = (classify.build_examples(classify.read_labelled(task.test_data, paths), labels, encoder)
            if task.test_data is not None else [])
    weights = classify.class_weights(task.class_weights, np.array([e.label for e in train]), len(labels))
    objective = classify.ClassificationObjective(len(labels), weights, task.monitor)
    collate = classify.ClassCollate(info.pad_id)
    model = ClassificationModel(base, len(labels), task.pooling, task.head_dropout)

    def finish(merged: nn.Module, export: Export, tmp: Path) -> None:
        assert isinstance(merged, ClassificationModel)
        device = merged.classifier.weight.device
        for split, examples in (("dev", dev), ("test", test)):
            if not examples:
                continue
            batches = eval_batches(examples, collate, task.eval_batch_size)
            export.numbers.update({f"{split}_{k}": v for k, v in evaluate(merged, objective, batches).items()})
            predicted = classify.predict(merged, batches, device)
            actual = np.array([e.label for e in examples])
            confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
            np.add.at(confusion, (actual, predicted), 1)
            report = classify.classification_metrics(confusion, labels)
            export.details[split] = {**report, "confusion": confusion.tolist(), "labels": labels}
            if split == "dev":
                export.metrics_extra["dev_per_class"] = report["per_class"]
                export.plots["confusion.png"] = classify.confusion_png(confusion, labels, f"{export.name}: dev")
                rows = [(labels[a], labels[p]) for a, p in zip(actual, predicted, strict=True)]
                export.plot_csv("predictions.csv", ["actual", "predicted"], rows)
        write_bytes(tmp / HEAD_FILE, head_bytes(merged))
        export.save(merged.backbone, tmp, {"classifier": {"labels": labels, "pooling": task.pooling,
                                                          "head_file": HEAD_FILE}})

    return Prepared(
        model=model, objective=objective, collate=collate, train=train, dev=dev, finish=finish, gpt_config=base.config,
        counts={"train_examples": len(train), "dev_examples": len(dev), "test_examples": len(test),
                "num_labels": len(labels)},
        modules_to_save=("classifier",),
        data_fingerprint=digest([*(e.ids for e in [*train, *dev]),
                                 np.array([e.label for e in [*train, *dev]]), np.array(labels, dtype=str)]),
    )


def prepare_token_classification(task: TokenClassificationTask, paths: Paths, base: GPT, sp: Any,
                                 info: TokenizerInfo, max_length: int) -> Prepared:
    train_items = tagging.read_tagged(task.train_data, paths, task.strict)
    labels = tagging.resolve_tags(train_items, task.labels)
    piece = tagging.label_piece(base.config.bidirectional)
    encoder = tagging.WordEncoder(sp, info.eos_id, max_length, piece)
    splits = {"dev": tagging.read_tagged(task.dev_data, paths, task.strict)}
    if task.test_data is not None:
        splits["test"] = tagging.read_tagged(task.test_data, paths, task.strict)
    train = tagging.build_examples(train_items, labels, encoder)
    examples = {split: tagging.build_examples(items, labels, encoder) for split, items in splits.items()}
    dev = examples["dev"]
    objective = tagging.TokenClassificationObjective(labels, task.monitor)
    collate = tagging.TagCollate(info.pad_id)
    model = TokenClassificationModel(base, len(labels), task.head_dropout)
    majority = tagging.majority_tagger(train_items)

    def finish(merged: nn.Module, export: Export, tmp: Path) -> None:
        assert isinstance(merged, TokenClassificationModel)
        device = merged.classifier.weight.device
        for split, items in splits.items():
            batches = eval_batches(examples[split], collate, task.eval_batch_size)
            export.numbers[f"{split}_loss"] = evaluate(merged, objective, batches)["loss"]
            report = tagging.score_tagger(merged, items, examples[split], labels, info.pad_id, task.eval_batch_size,
                                          device)
            baseline = tagging.entity_scores([i.tags for i in items], tagging.tag_with(majority, items))["overall"]
            export.numbers.update({f"{split}_{k}": v for k, v in report["overall"].items()})
            export.numbers[f"{split}_majority_f1"] = baseline["f1"]
            export.metrics_extra[f"{split}_per_entity"] = report["per_entity"]
            export.details[split] = {**report, "majority": baseline, "labels": labels}
        write_bytes(tmp / HEAD_FILE, head_bytes(merged))
        export.save(merged.backbone, tmp, {"classifier": {"labels": labels, "level": "token", "scheme": task.scheme,
                                                          "label_piece": piece, "head_file": HEAD_FILE}})

    return Prepared(
        model=model, objective=objective, collate=collate, train=train, dev=dev, finish=finish, gpt_config=base.config,
        counts={"train_examples": len(train_items), "dev_examples": len(splits["dev"]),
                "test_examples": len(splits.get("test", [])), "num_labels": len(labels),
                "train_windows": len(train), "dev_windows": len(dev)},
        modules_to_save=("classifier",),
        data_fingerprint=digest([*(a for e in [*train, *dev] for a in (e.ids, e.target)), np.array(labels, dtype=str)]),
    )


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: Sequence[Batch]) -> dict[str, float]:
    """Dev metrics of ``model`` in eval mode and full precision over ``batches``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(objective.sums_size, device=device)
    for batch in batches:
        total += objective.eval_sums(model, {k: v.to(device) for k, v in batch.items()}).float()
    model.train(was_training)
    return objective.metrics(total)


# ----------------------------------------------------------------------------------- export


@dataclass
class Export:
    """Collects a task's outputs and writes the model directory, metrics, plots and MLflow logs."""

    name: str
    task: Task
    paths: Paths
    init_dir: Path
    info: TokenizerInfo
    key: str
    numbers: dict[str, Any]
    history: list[dict[str, float]]
    details: dict[str, Any] = field(default_factory=dict)
    metrics_extra: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # MLflow tables (log_table)
    plots: dict[str, bytes] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.paths.models / "finetune" / self.name

    @property
    def metrics_path(self) -> Path:
        return self.paths.metrics / f"finetune_{self.name}.json"

    @property
    def plots_dir(self) -> Path:
        return self.paths.plots / "finetune" / self.name

    def plot_csv(self, name: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        self.plots[name] = buffer.getvalue().encode("utf-8")

    def save(self, model: GPT, tmp: Path, extra: dict[str, Any]) -> None:
        """Write model, config, eval.json and the manifest into the temporary model directory."""
        task = self.task
        numbers = {k: v for k, v in self.numbers.items() if isinstance(v, int | float)}
        save_model(model, tmp, extra={
            "tokenizer_fingerprint": self.info.fingerprint, "eos_id": self.info.eos_id, "pad_id": self.info.pad_id,
            "objective": "mlm" if model.config.bidirectional else "clm", **extra,
            "finetune": {"task": self.name, "type": task.type, "method": task.method, "run_key": self.key,
                         "init": task.init, "base_fingerprint": fingerprint_path(self.init_dir),
                         "max_length": task.max_length or model.config.block_size,
                         "lora": task.lora.model_dump() if task.method == "lora" else None},
            "training": numbers,
        })
        write_json(tmp / "eval.json", {"history": self.history, **self.details})
        inputs: dict[str, Path] = {"base_model": self.init_dir, "tokenizer": self.info.directory / "tokenizer.json"}
        for role in ("train_data", "dev_data"):
            source: DataSource = getattr(task, role)
            if isinstance(source, SplitData):
                inputs[role] = self.paths.split / source.split
            elif isinstance(source, FilesData) and len(source.paths) == 1 and (self.paths.root / source.paths[0]).is_file():
                inputs[role] = self.paths.root / source.paths[0]
        write_manifest(tmp, stage="finetune", config=task, inputs=inputs,
                       counts={k: numbers[k] for k in ("train_examples", "dev_examples", "steps") if k in numbers},
                       extra={"task": self.name, "tokenizer_fingerprint": self.info.fingerprint})

    def finish(self) -> dict[str, Any]:
        """Write metrics and the dev curve, log to MLflow; return the task-prefixed summary."""
        metrics = {k: v for k, v in self.numbers.items() if isinstance(v, int | float)}
        write_json(self.metrics_path, {**metrics, **self.metrics_extra})
        if self.history:
            keys = [k for k in self.history[0] if k != "step"]
            self.plot_csv("dev.csv", ["step", *keys], ([int(h["step"]), *(h[k] for k in keys)] for h in self.history))
        with atomic_dir(self.plots_dir) as tmp:
            for name, data in self.plots.items():
                write_bytes(tmp / name, data)
        tracker = TaskTracker(tracking.active(), self.name)
        tracker.log_dict({"history": self.history, **self.details}, "eval.json")
        for name, rows in self.tables.items():
            tracker.log_table(rows, name)
        tracker.set_tags({"type": self.task.type, "method": self.task.method, "run_key": self.key})
        tracker.log_artifact(self.directory, "model")
        tracker.log_artifact(self.plots_dir, "plots")
        tracker.log_artifact(self.metrics_path)
        log.info("finetune %s: %s", self.name, ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k.startswith(("dev_", "test_"))))
        # Artifacts are logged above under the task's prefix; none are left for the CLI to log
        # at the run's root, where two tasks' model files would overwrite each other.
        return {f"{self.name}/{k}": v for k, v in metrics.items()}


class TaskTracker(StageTracker):
    """The stage's MLflow run seen by one task: metric keys, text/dict names and artifact paths get
    the task's name as prefix, so several tasks can share one run without overwriting each other."""

    def __init__(self, inner: StageTracker, task: str) -> None:
        super().__init__(None, inner.run_id)
        self.inner, self.task = inner, task

    @property
    def enabled(self) -> bool:
        return self.inner.enabled

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params({self.task: dict(params)})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self.inner.log_metrics({f"{self.task}/{k}": v for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, f"{self.task}/{artifact_path}" if artifact_path else self.task)

    def log_dict(self, obj: Any, name: str) -> None:
        self.inner.log_dict(obj, f"{self.task}/{name}")

    def log_text(self, text: str, name: str) -> None:
        self.inner.log_text(text, f"{self.task}/{name}")

    def log_table(self, rows: list[dict[str, Any]], name: str) -> None:
        self.inner.log_table(rows, f"{self.task}/{name}")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.inner.set_tags({f"{self.task}.{k}": v for k, v in tags.items()})

"""Stage ``distill``: train a smaller student to imitate a frozen teacher, and its no-teacher baseline.

Reads the teacher (``models/pretrain`` or a finetuned classifier; its tokenizer fingerprint must
match the data's, else FingerprintMismatch), ``artifacts/tokenizer/`` and the training data:
``data/tokens/{train,val}.bin`` (``task: lm``) or labelled rows (``task: classification``).
Writes (rank 0, atomically), with ``<name>`` = ``distill`` or ``distill_baseline``:
``models/<name>/`` (model.safetensors, config.json with the tokenizer fingerprint and how it was
distilled, manifest.json; a classifier also head.safetensors, labels and pooling);
``metrics/<name>.json`` (val loss / bits per byte or dev accuracy / F1 of student and teacher, KL
to the teacher, parameters); ``plots/<name>_loss.csv`` (step, train_loss, val_loss); checkpoints
in ``checkpoints/distill/{student,baseline}/<run key>/`` and precomputed teacher targets in
``checkpoints/distill/teacher_cache/<key>/``.

The loop is the one loop of every stage (:func:`lmpipe.train.loop.fit`: manual optimisation,
accumulation, DDP, LR schedule, atomic checkpoints, exact resume) with a distillation objective. The teacher lives outside the LightningModule, so it is neither optimised,
checkpointed nor wrapped by DDP; it runs in eval mode under the same autocast (bf16 on GPUs).
Language modelling trains on the train split's non-overlapping windows of block_size + 1 tokens,
in a seeded random order per epoch: fixed windows are what let the teacher be precomputed once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lmpipe import tracking
from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.io import (
    atomic_dir,
    atomic_write,
    config_hash,
    fingerprint_path,
    sha256_file,
    write_bytes,
    write_json,
    write_manifest,
)
from lmpipe.model.classifier import HEAD_FILE, ClassificationModel, head_bytes, load_classifier
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import ExpectedTokenizer, load_model, read_model_config, refuse_masked_lm, save_model
from lmpipe.train.callbacks import DevEvaluation, TaskAsyncTracker, TrainingMonitor, Validation
from lmpipe.train.checkpoint import ResumePoint
from lmpipe.train.data import TokenSplit, gather_windows, open_token_split, val_batches
from lmpipe.train.distill.config import DistillConfig
from lmpipe.train.distill.losses import (
    DistillLoss,
    TeacherCache,
    TopKTargets,
    backbone,
    block_outputs,
    hidden_layer_map,
    init_from_teacher,
    make_projections,
    precompute_classes,
    precompute_windows,
    soft_kl,
)
from lmpipe.train.finetune import classify
from lmpipe.train.finetune.data import Batch, TrainBatches, eval_batches
from lmpipe.train.loop import Run, fit
from lmpipe.train.module import TrainModule
from lmpipe.train.objectives import Objective
from lmpipe.train.settings import run_key

log = logging.getLogger(__name__)

HEAD_DROPOUT = 0.1  # the classifier's dropout before its head, as the finetune stage's default


def run(cfg: DistillConfig, paths: Paths) -> dict[str, Any]:
    """Entry point of ``lmpipe distill``; see the module docstring for inputs and outputs.

    Raises FingerprintMismatch when teacher and data come from different tokenizers, ConfigError
    for an impossible student, DataError for missing or malformed inputs, TrainingDiverged on a
    non-finite loss.
    """
    teacher_dir = paths.root / cfg.teacher
    # The student is a causal decoder: a masked-LM teacher (or a classifier on one) is refused
    # from its config.json, before any data or weight is read.
    refuse_masked_lm(read_model_config(teacher_dir), teacher_dir, "distill.teacher",
                     "distill trains a causal student, which reads text")
    if cfg.task == "lm":
        return train(cfg, paths, prepare_lm(cfg, paths, teacher_dir))
    return train(cfg, paths, prepare_classification(cfg, paths, teacher_dir))


# ----------------------------------------------------------------------------------- models


def expected_tokenizer(fingerprint: str, source: str) -> ExpectedTokenizer:
    """The tokenizer the teacher must have been trained with: the data's."""
    return ExpectedTokenizer(fingerprint, source, "distil a teacher trained on these tokens "
                             "(re-run pretrain/finetune with this tokenizer)")


class DistillStudent(nn.Module):
    """The student being trained and the projections of hidden-state matching (trained with it,
    not exported). Calling it calls the student."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList) -> None:
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, *args: Tensor) -> Any:
        return self.student(*args)


# -------------------------------------------------------------------------------- objective


class DistillObjective(Objective):
    """The loss the one loop minimises: student forward, teacher targets (online, or precomputed in the batch), weighted
    distillation terms. Each term's running sum is kept on the device for logging."""

    monitor, mode, sums_size = "loss", "min", 2

    def __init__(self, task: str, loss: DistillLoss, teacher: nn.Module | None,
                 pairs: list[tuple[int, int]]) -> None:
        self.task, self.loss_fn, self.teacher, self.pairs = task, loss, teacher, pairs
        self.part_sums: dict[str, Tensor] = {}
        self.part_count = 0

    def _forward(self, model: nn.Module, batch: Batch) -> Tensor:
        if self.task == "lm":
            return model(batch["input"])[0]
        return model(batch["input"], batch["length"])

    def _teacher(self, batch: Batch) -> tuple[Tensor | TopKTargets | None, dict[int, Tensor]]:
        if "teacher_logp" in batch:
            return TopKTargets(batch["teacher_logp"], batch["teacher_ids"]), {}
        if "teacher_logits" in batch:
            return batch["teacher_logits"], {}
        if self.teacher is None:
            return None, {}
        device = batch["input"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad(), block_outputs(backbone(self.teacher), [j for _, j in self.pairs]) as states:
            logits = self._forward(self.teacher, batch)
        return logits, dict(states)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        assert isinstance(model, DistillStudent)
        with block_outputs(backbone(model.student), [i for i, _ in self.pairs]) as s_states:
            logits = self._forward(model.student, batch)
        teacher, t_states = self._teacher(batch)
        targets = batch["target"] if self.task == "lm" else batch["label"]
        real = torch.arange(batch["input"].shape[1], device=targets.device)[None, :] < batch["length"][:, None]
        hidden = None
        if self.pairs:
            hidden = ([s_states[i] for i, _ in self.pairs], [t_states[j] for _, j in self.pairs], model.projections)
        total, parts = self.loss_fn(logits, targets, teacher, mask=targets != -100 if self.task == "lm" else None,
                                    hidden=hidden, hidden_mask=real)
        for name, value in parts.items():
            self.part_sums[name] = self.part_sums.get(name, torch.zeros((), device=value.device)) + value.detach()
        self.part_count += 1
        return total

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: Batch) -> Tensor:
        """[sum of next-token losses, tokens] of the student (lm val batches)."""
        _, loss = (model.student if isinstance(model, DistillStudent) else model)(batch["input"], batch["target"])
        count = (batch["target"] != -100).sum()
        return torch.stack([loss.float() * count, count.float()])

    def metrics(self, sums: Tensor) -> dict[str, float]:
        loss_sum, count = sums.tolist()
        return {"loss": loss_sum / max(count, 1.0)}

    def consume_parts(self) -> dict[str, Tensor]:
        """Mean of each loss term since the last call (device tensors), then reset."""
        out = {name: value / max(1, self.part_count) for name, value in self.part_sums.items()}
        self.part_sums, self.part_count = {}, 0
        return out


# --------------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    """A run made ready: the student (wrapped), objective, batches, evaluation callback, and the
    export of the trained student."""

    model: DistillStudent
    objective: DistillObjective
    data: TrainBatches
    evaluation: Callable[[TrainingMonitor], Callback]
    export: Callable[[DistillStudent, Callback, TrainingMonitor, dict[str, Any]], list[str]]
    fingerprint: str
    counts: dict[str, Any] = field(default_factory=dict)


def build_student(cfg: DistillConfig, teacher: nn.Module | None, teacher_gpt: GPTConfig) -> tuple[GPT, list[int] | None]:
    """A student GPT, initialised from the teacher's blocks when configured and possible."""
    torch.manual_seed(cfg.seed)
    student = GPT(cfg.student_config(teacher_gpt))
    if cfg.baseline or cfg.student.init == "scratch" or teacher is None:
        return student, None
    mapping = init_from_teacher(student, backbone(teacher))
    if mapping is None and cfg.student.init == "teacher":
        raise ConfigError("distill.student.init: 'teacher' needs the teacher's width, heads, MLP and norm and at most "
                          "its number of blocks; use init: auto or scratch for this student")
    log.info("student initialised %s", f"from teacher blocks {mapping}" if mapping else "at random")
    return student, mapping


def objective_for(cfg: DistillConfig, teacher: nn.Module | None, student: GPT, teacher_gpt: GPTConfig) -> tuple[
        DistillObjective, nn.ModuleList]:
    if cfg.baseline:
        return DistillObjective(cfg.task, DistillLoss(soft=0.0, hard=1.0), None, []), nn.ModuleList()
    w = cfg.losses
    pairs = hidden_layer_map(student.config.n_layer, teacher_gpt.n_layer) if w.hidden > 0 else []
    loss = DistillLoss(soft=w.soft, hard=w.hard, reverse_kl=w.reverse_kl, hidden=w.hidden,
                       temperature=cfg.temperature, hidden_kind=w.hidden_kind)
    projections = make_projections(student.config.n_embd, teacher_gpt.n_embd, len(pairs))
    return DistillObjective(cfg.task, loss, teacher, pairs), projections


def prepare_lm(cfg: DistillConfig, paths: Paths, teacher_dir: Path) -> Prepared:
    train_split = open_token_split(paths.tokens, "train", paths.tokenizer)
    val_split = open_token_split(paths.tokens, "val", paths.tokenizer)
    meta = train_split.meta
    expected = expected_tokenizer(meta["tokenizer_fingerprint"], str(paths.tokens / "meta.json"))
    teacher_config = read_model_config(teacher_dir, expected)
    teacher_gpt = GPTConfig.from_dict(teacher_config["model"])
    teacher = None if cfg.baseline else load_model(teacher_dir, tokenizer=expected)[0]
    student, mapping = build_student(cfg, teacher, teacher_gpt)
    block = student.config.block_size
    if block > teacher_gpt.block_size:
        raise ConfigError(f"distill.student.model.block_size: {block} exceeds the teacher's {teacher_gpt.block_size}")
    windows = (train_split.n_tokens - 1) // block
    if windows < 1:
        raise ConfigError(f"distill: the train split ({train_split.n_tokens} tokens) is shorter than one window")
    objective, projections = objective_for(cfg, teacher, student, teacher_gpt)
    cache: TeacherCache | None = None
    if teacher is not None and cfg.teacher_logits == "precomputed":
        if cfg.losses.reverse_kl > 0:
            log.warning("reverse KL on top-%d targets sees the teacher's tail as one bucket: a lower bound", cfg.top_k)
        key = config_hash({"teacher": fingerprint_path(teacher_dir), "tokens": sha256_file(paths.tokens / "meta.json"),
                           "block": block, "k": cfg.top_k, "T": cfg.temperature})[:16]
        cache = precompute_windows(paths.checkpoints / "distill" / "teacher_cache" / key, teacher, train_split.tokens,
                                   block, windows, cfg.top_k, cfg.temperature, cfg.eval_batch_size, cfg.progress)
    data = TrainBatches(range(windows), WindowCollate(train_split, block, cache), micro_batch_size=cfg.micro_batch_size,
                        accumulation=cfg.accumulation, max_steps=cfg.max_steps, seed=cfg.seed)
    wrapped = DistillStudent(student, projections)
    tokens_per_byte = val_split.n_tokens / val_split.n_bytes if val_split.n_bytes else None

    def batches(rank: int, world: int) -> Any:
        return val_batches(val_split, block, cfg.micro_batch_size, cfg.eval_batches, rank, world, cfg.seed)

    def evaluation(monitor: TrainingMonitor) -> Callback:
        return Validation(every=cfg.eval_every, batches=batches, tokens_per_byte=tokens_per_byte, monitor=monitor)

    def export(model: DistillStudent, callback: Callback, monitor: TrainingMonitor, numbers: dict[str, Any]) -> list[str]:
        numbers.update(lm_scores(backbone(model.student), teacher, list(batches(0, 1)), tokens_per_byte))
        info = {"eos_id": meta["eos_id"], "pad_id": meta.get("pad_id"), "objective": "clm"}
        curve = [(int(step), loss) for step, loss, _ in monitor.val]
        return write_outputs(cfg, paths, backbone(model.student), teacher_dir, teacher_config, info, numbers, mapping,
                             {"tokens_meta": paths.tokens / "meta.json"}, monitor.train, curve)

    return Prepared(wrapped, objective, data, evaluation, export, sha256_file(paths.tokens / "meta.json"),
                    {"train_windows": windows, "block_size": block})


class WindowCollate:
    """Windows (by index) of the train split -> ``input``, ``target``, ``length`` and, with a
    cache, the teacher's precomputed top-k ``teacher_logp`` / ``teacher_ids``."""

    def __init__(self, split: TokenSplit, block: int, cache: TeacherCache | None) -> None:
        self.split, self.block, self.cache = split, block, cache

    def __call__(self, windows: list[int]) -> Batch:
        rows = np.asarray(windows, dtype=np.int64)
        window = gather_windows(self.split.tokens, rows * self.block, self.block + 1)
        batch = {"input": window[:, :-1], "target": window[:, 1:],
                 "length": torch.full((len(rows),), self.block, dtype=torch.long)}
        if self.cache is not None:
            batch["teacher_logp"], batch["teacher_ids"] = self.cache.rows(rows)
        return batch


@torch.no_grad()
def lm_scores(student: GPT, teacher: GPT | None, batches: list[Batch], tokens_per_byte: float | None) -> dict[str, float]:
    """Final val loss and bits per byte of the student (and teacher), and KL(teacher || student) at T=1."""
    device = next(student.parameters()).device
    student.eval()
    sums, count = {"val_loss": 0.0, "teacher_val_loss": 0.0, "val_kl_to_teacher": 0.0}, 0
    for batch in batches:
        idx, target = batch["input"].to(device), batch["target"].to(device)
        logits, loss = student(idx, target)
        n = int((target != -100).sum())
        sums["val_loss"], count = sums["val_loss"] + float(loss) * n, count + n
        if teacher is not None:
            t_logits, t_loss = teacher.to(device)(idx, target)
            sums["teacher_val_loss"] += float(t_loss) * n
            sums["val_kl_to_teacher"] += float(soft_kl(logits, t_logits, 1.0, target != -100)) * n
    out = {k: v / max(count, 1) for k, v in sums.items() if teacher is not None or k == "val_loss"}
    if tokens_per_byte:
        for key in [k for k in out if k.endswith("val_loss")]:
            out[key.replace("loss", "bpb")] = out[key] * tokens_per_byte / math.log(2)
    return out


def prepare_classification(cfg: DistillConfig, paths: Paths, teacher_dir: Path) -> Prepared:
    from lmpipe.tokenizer.train import load_tokenizer

    sp, info = load_tokenizer(paths.tokenizer)
    expected = expected_tokenizer(info.fingerprint, str(paths.tokenizer))
    teacher_config = read_model_config(teacher_dir, expected)
    spec = teacher_config.get("classifier")
    if not isinstance(spec, dict):
        raise ConfigError(f"distill.teacher: {teacher_dir} is not a classifier (config.json has no 'classifier'); "
                          "task: classification needs a model written by `lmpipe finetune` for a classification task")
    labels, pooling = list(spec["labels"]), str(spec.get("pooling", "last"))
    teacher_gpt = GPTConfig.from_dict(teacher_config["model"])
    teacher = None if cfg.baseline else load_classifier(teacher_dir, tokenizer=expected)[0]
    student_gpt, mapping = build_student(cfg, teacher, teacher_gpt)
    student = ClassificationModel(student_gpt, len(labels), pooling, HEAD_DROPOUT)
    if mapping is not None and teacher is not None:  # the widths agree: start from the teacher's head too
        head = {k: v for k, v in teacher.state_dict().items() if not k.startswith("backbone.")}
        student.load_state_dict(head, strict=False)
    encoder = classify.TextEncoder(sp, info.eos_id, cfg.max_length or student_gpt.config.block_size)
    train = classify.build_examples(classify.read_labelled(cfg.train_data, paths), labels, encoder)
    dev = classify.build_examples(classify.read_labelled(cfg.dev_data, paths), labels, encoder)
    objective, projections = objective_for(cfg, teacher, student_gpt, teacher_gpt)
    fingerprint = config_hash([e.ids.tolist() + [e.label] for e in train])
    logits = None
    if teacher is not None and cfg.teacher_logits == "precomputed":
        key = config_hash({"teacher": fingerprint_path(teacher_dir), "data": fingerprint})[:16]
        logits = precompute_classes(paths.checkpoints / "distill" / "teacher_cache" / key, teacher, train,
                                    classify.ClassCollate(info.pad_id), cfg.eval_batch_size)
    dev_collate = classify.ClassCollate(info.pad_id)

    def collate(rows: list[int]) -> Batch:  # with the teacher's class logits of each example, when precomputed
        batch = dev_collate([train[i] for i in rows])
        if logits is not None:
            batch["teacher_logits"] = torch.from_numpy(logits[np.asarray(rows)])
        return batch

    data = TrainBatches(range(len(train)), collate, micro_batch_size=cfg.micro_batch_size,
                        accumulation=cfg.accumulation, max_steps=cfg.max_steps, seed=cfg.seed)
    scorer = classify.ClassificationObjective(len(labels), None, "accuracy")

    def evaluation(monitor: TrainingMonitor) -> Callback:
        return DevEvaluation(every=cfg.eval_every, objective=scorer, patience=cfg.patience, min_delta=cfg.min_delta,
                             tracker=monitor.tracker,
                             batches=lambda rank, world: eval_batches(dev, dev_collate, cfg.eval_batch_size, rank, world))

    def export(model: DistillStudent, callback: Callback, monitor: TrainingMonitor, numbers: dict[str, Any]) -> list[str]:
        assert isinstance(callback, DevEvaluation)
        callback.restore_best(model)
        numbers.update(class_scores(model.student, teacher, eval_batches(dev, dev_collate, cfg.eval_batch_size), scorer))
        extra = {"eos_id": info.eos_id, "pad_id": info.pad_id, "objective": "clm",
                 "classifier": {"labels": labels, "pooling": pooling, "head_file": HEAD_FILE}}
        curve = [(int(h["step"]), h["loss"]) for h in callback.history]
        assert isinstance(model.student, ClassificationModel)
        return write_outputs(cfg, paths, model.student.backbone, teacher_dir, teacher_config, extra, numbers, mapping,
                             {"tokenizer": paths.tokenizer / "tokenizer.json"}, monitor.train, curve,
                             head=head_bytes(model.student))

    return Prepared(DistillStudent(student, projections), objective, data, evaluation, export, fingerprint,
                    {"train_examples": len(train), "dev_examples": len(dev)})


@torch.no_grad()
def class_scores(student: nn.Module, teacher: nn.Module | None, batches: list[Batch],
                 scorer: classify.ClassificationObjective) -> dict[str, float]:
    """Dev accuracy/F1 of the student (and teacher) and the share of examples where they agree."""
    device = next(student.parameters()).device
    student.eval()
    out: dict[str, float] = {}
    models = {"dev": student} if teacher is None else {"dev": student, "teacher_dev": teacher.to(device)}
    predictions = {}
    for prefix, model in models.items():
        total = torch.zeros(scorer.sums_size, device=device)
        for batch in batches:
            total += scorer.eval_sums(model, {k: v.to(device) for k, v in batch.items()}).float()
        out.update({f"{prefix}_{k}": v for k, v in scorer.metrics(total).items()})
        predictions[prefix] = classify.predict(model, batches, device)
    if teacher is not None:
        out["dev_agreement_with_teacher"] = float((predictions["dev"] == predictions["teacher_dev"]).mean())
    return out


# ------------------------------------------------------------------------------------ training


def train(cfg: DistillConfig, paths: Paths, prepared: Prepared) -> dict[str, Any]:
    """Fit the student in the one loop (resuming a checkpoint of the same run), export it, return
    the summary."""
    name = cfg.run_name
    key = run_key(cfg, teacher=fingerprint_path(paths.root / cfg.teacher), data=prepared.fingerprint)
    student = backbone(prepared.model.student)

    def start(trainer: L.Trainer, resume: ResumePoint | None) -> TrainModule:
        L.seed_everything(cfg.seed, verbose=False)
        if trainer.is_global_zero:
            log.info("%s (%s): student of %.2fM parameters, %d steps, run %s", name, cfg.task,
                     student.num_parameters() / 1e6, cfg.max_steps, key)
        return TrainModule(prepared.model.train(), prepared.objective, cfg, seed=cfg.seed, run_key=key,
                           accumulation=cfg.accumulation, data=prepared.data)

    fitted = fit(Run(
        label=name, settings=cfg, checkpoint_dir=paths.checkpoints / "distill" / ("baseline" if cfg.baseline else
                                                                                   "student") / key,
        key=key, tracker=TaskAsyncTracker(tracking.active(), name), start=start,
        evaluation=lambda monitor: [prepared.evaluation(monitor)], also_at=(cfg.eval_every,),
    ))
    numbers: dict[str, Any] = {**fitted.summary, "parameters": student.num_parameters(), **prepared.counts}
    if not fitted.trainer.is_global_zero:
        return numbers
    artifacts = prepared.export(prepared.model, fitted.callbacks[0], fitted.monitor, numbers)
    return {**{k: v for k, v in numbers.items() if isinstance(v, int | float)}, "artifacts": artifacts}


def write_outputs(cfg: DistillConfig, paths: Paths, student: GPT, teacher_dir: Path, teacher_config: dict[str, Any],
                  extra: dict[str, Any], numbers: dict[str, Any], mapping: list[int] | None,
                  inputs: dict[str, Path], train_curve: list[list[float]], val_curve: list[tuple[int, float]],
                  head: bytes | None = None) -> list[str]:
    """Model directory, metrics JSON and loss curve CSV; returns the artifact paths."""
    with torch.device("meta"):
        numbers["teacher_parameters"] = GPT(GPTConfig.from_dict(teacher_config["model"])).num_parameters()
    numbers["parameter_ratio"] = numbers["parameters"] / numbers["teacher_parameters"]
    flat = {k: v for k, v in numbers.items() if isinstance(v, int | float)}
    name, model_dir = cfg.run_name, paths.models / cfg.run_name
    with atomic_dir(model_dir) as tmp:
        save_model(student.cpu(), tmp, extra={
            "tokenizer_fingerprint": teacher_config["tokenizer_fingerprint"], **extra,
            "distill": {"task": cfg.task, "baseline": cfg.baseline, "teacher": cfg.teacher,
                        "teacher_fingerprint": fingerprint_path(teacher_dir), "init_from_teacher_blocks": mapping,
                        "losses": None if cfg.baseline else cfg.losses.model_dump(), "temperature": cfg.temperature,
                        "teacher_logits": cfg.teacher_logits},
            "training": flat})
        if head is not None:
            write_bytes(tmp / HEAD_FILE, head)
        write_manifest(tmp, stage="distill", config=cfg, inputs={"teacher": teacher_dir, **inputs},
                       counts={"parameters": flat["parameters"], "steps": flat["steps"]},
                       extra={"tokenizer_fingerprint": teacher_config["tokenizer_fingerprint"]})
    metrics_path, csv_path = paths.metrics / f"{name}.json", paths.plots / f"{name}_loss.csv"
    write_json(metrics_path, flat)
    rows: dict[int, list[str]] = {}
    for step, loss in train_curve:
        rows.setdefault(int(step), ["", ""])[0] = repr(loss)
    for step, loss in val_curve:
        rows.setdefault(int(step), ["", ""])[1] = repr(loss)
    with atomic_write(csv_path, "w", encoding="utf-8") as handle:
        handle.write("step,train_loss,val_loss\n")
        handle.writelines(f"{step},{train},{val}\n" for step, (train, val) in sorted(rows.items()))
    log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in flat.items() if "val" in k or "dev" in k))
    return [str(model_dir), str(metrics_path), str(csv_path)]

"""The distill stage end to end on tiny models: outputs, baseline, resume, precomputed teacher,
classification, student shapes and the tokenizer check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lmpipe.config import Paths
from lmpipe.errors import ConfigError, FingerprintMismatch
from lmpipe.io import verify_manifest, write_manifest
from lmpipe.model.classifier import HEAD_FILE, ClassificationModel, head_bytes, load_classifier
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.model.io import load_model, save_model
from lmpipe.train.data import open_token_split, val_batches, write_synthetic_shards
from lmpipe.train.distill import stage as distill
from lmpipe.train.distill.config import DistillConfig
from lmpipe.train.distill.losses import soft_kl

FAST = {"max_steps": 30, "micro_batch_size": 8, "warmup_steps": 3, "eval_every": 15, "eval_batches": 4,
        "log_every": 5, "checkpoint_every": 0, "progress": False, "accelerator": "cpu", "lr": 1e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


def save_teacher(directory: Path, fingerprint: str = "synthetic", **overrides: Any) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{"vocab_size": 40, "block_size": 16, "n_layer": 4, "n_head": 2, "n_embd": 32, **overrides}))
    save_model(model, directory, extra={"tokenizer_fingerprint": fingerprint, "eos_id": 0, "objective": "clm"})
    write_manifest(directory, stage="pretrain", config={"test": True})
    return model


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(tmp_path)
    write_synthetic_shards(paths.tokens, vocab_size=40, train_tokens=4000, val_tokens=600)
    save_teacher(paths.models / "pretrain")
    return paths


def config(**overrides: Any) -> DistillConfig:
    return DistillConfig.model_validate({**FAST, **overrides})


def kl_to(teacher: GPT, student: GPT, paths: Paths) -> float:
    split = open_token_split(paths.tokens, "val")
    batches = list(val_batches(split, 16, 8, 4, 0, 1, 0))
    with torch.no_grad():
        return sum(soft_kl(student(b["input"])[0], teacher(b["input"])[0], 1.0).item() for b in batches) / len(batches)


def test_distilled_student_imitates_the_teacher_better_than_the_baseline(paths: Paths) -> None:
    summary = distill.run(config(), paths)
    baseline = distill.run(config(baseline=True), paths)
    assert summary["steps"] == baseline["steps"] == 30  # same budget
    assert summary["parameters"] == baseline["parameters"] < summary["teacher_parameters"]

    for name in ("distill", "distill_baseline"):
        verify_manifest(paths.models / name)
        rows = (paths.plots / f"{name}_loss.csv").read_text().splitlines()
        assert rows[0] == "step,train_loss,val_loss" and rows[-1].startswith("30,") and rows[-1].split(",")[2]
        metrics = json.loads((paths.metrics / f"{name}.json").read_text())
        assert metrics["val_bpb"] > 0 and metrics["parameter_ratio"] < 1
    student, info = load_model(paths.models / "distill")
    assert info["tokenizer_fingerprint"] == "synthetic" and student.config.n_layer == 2
    assert info["distill"]["init_from_teacher_blocks"] == [0, 2] and not info["distill"]["baseline"]
    base, base_info = load_model(paths.models / "distill_baseline")
    assert base_info["distill"]["baseline"] and base_info["distill"]["init_from_teacher_blocks"] is None
    assert {"train_soft", "val_kl_to_teacher", "teacher_val_bpb"} <= set(summary) and "train_hard" not in summary
    assert "train_hard" in baseline and "train_soft" not in baseline  # the baseline never sees the teacher

    teacher, _ = load_model(paths.models / "pretrain")
    assert kl_to(teacher, student, paths) < 0.5 * kl_to(teacher, base, paths)
    assert summary["val_kl_to_teacher"] == pytest.approx(kl_to(teacher, student, paths), rel=1e-3)

    again = distill.run(config(), paths)  # same run: resumes from its final checkpoint, nothing retrained
    assert again["resumed_from_step"] == 30 and again["val_bpb"] == pytest.approx(summary["val_bpb"])


def test_precomputed_teacher_and_hidden_matching_train_a_narrower_student(paths: Paths) -> None:
    narrow = {"model": {"n_layer": 2, "n_embd": 16, "n_head": 2}}
    cached = distill.run(config(teacher_logits="precomputed", top_k=8, student=narrow), paths)
    caches = list((paths.checkpoints / "distill" / "teacher_cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "logp.npy").is_file()
    assert cached["parameters"] < 0.3 * cached["teacher_parameters"]
    assert json.loads((paths.models / "distill" / "config.json").read_text())["distill"]["init_from_teacher_blocks"] is None

    hidden = distill.run(config(student=narrow, losses={"soft": 1.0, "hard": 0.5, "hidden": 1.0, "reverse_kl": 0.5}),
                         paths)
    assert {"train_hidden", "train_reverse_kl"} <= set(hidden)
    student, _ = load_model(paths.models / "distill")  # the projections are training-only, not exported
    assert student.config.n_embd == 16


def test_teacher_of_another_tokenizer_is_refused(paths: Paths) -> None:
    save_teacher(paths.models / "pretrain", fingerprint="another-tokenizer")
    with pytest.raises(FingerprintMismatch, match="the model was trained with tokenizer another-tok"):
        distill.run(config(), paths)
    assert not (paths.models / "distill").exists()


def test_student_shapes_and_init_rules() -> None:
    teacher = GPTConfig(vocab_size=40, block_size=16, n_layer=4, n_head=4, n_embd=32)
    cfg = config(student={"model": {"n_layer": 2, "n_head": 2}})
    student = cfg.student_config(teacher)
    assert (student.n_layer, student.n_head, student.n_kv_head, student.vocab_size) == (2, 2, 2, 40)
    assert config(student={"preset": "tiny"}).student_config(teacher).n_embd == 128
    with pytest.raises(ConfigError, match="distill.student: .*divisible"):
        config(student={"model": {"n_embd": 30}}).student_config(teacher)
    with pytest.raises(ValueError, match="student.preset: unknown 'huge'"):
        config(student={"preset": "huge"})
    with pytest.raises(ValueError, match="teacher_logits: online"):
        config(teacher_logits="precomputed", losses={"hidden": 1.0})

    big = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=4, n_head=2, n_embd=32))
    small = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert distill.init_from_teacher(small, big) == [0, 2]
    assert torch.equal(small.blocks[1].mlp.c_fc.weight, big.blocks[2].mlp.c_fc.weight)
    assert torch.equal(small.wte.weight, big.wte.weight) and small.lm_head.weight is small.wte.weight
    narrow = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    assert distill.init_from_teacher(narrow, big) is None
    with pytest.raises(ConfigError, match="init: 'teacher' needs the teacher's width"):
        distill.build_student(config(student={"model": {"n_layer": 2, "n_embd": 16}, "init": "teacher"}), big,
                              big.config)


def test_classification_student_learns_from_the_teacher_classifier(tmp_path: Path) -> None:
    from test_finetune_helpers import make_project

    paths = make_project(tmp_path, n_train=120, n_val=40, n_test=4)
    backbone, info = load_model(paths.models / "pretrain")
    torch.manual_seed(0)
    teacher = ClassificationModel(backbone, 2, "last", 0.0)
    directory = paths.models / "finetune" / "cls"
    save_model(teacher.backbone, directory, extra={
        "tokenizer_fingerprint": info["tokenizer_fingerprint"], "objective": "clm",
        "classifier": {"labels": ["negative", "positive"], "pooling": "last", "head_file": HEAD_FILE}})
    (directory / HEAD_FILE).write_bytes(head_bytes(teacher))
    write_manifest(directory, stage="finetune", config={"test": True})

    cfg = config(task="classification", teacher="models/finetune/cls", teacher_logits="precomputed", max_steps=12,
                 eval_every=6, temperature=1.0, losses={"soft": 1.0, "hard": 0.0}, student={"model": {"n_layer": 1}})
    summary = distill.run(cfg, paths)
    assert summary["dev_agreement_with_teacher"] > 0.9  # a 1-block copy of the teacher, trained on its outputs
    assert 0 <= summary["dev_accuracy"] <= 1 and "teacher_dev_accuracy" in summary
    model, labels, config_json = load_classifier(paths.models / "distill")
    assert labels == ["negative", "positive"] and model.backbone.config.n_layer == 1
    assert config_json["distill"]["task"] == "classification"
    with pytest.raises(ConfigError, match="is not a classifier"):
        distill.run(cfg.model_copy(update={"teacher": "models/pretrain"}), paths)

"""The masked-LM objective to the end: pretrain a tiny masked LM, score it on masked tokens (never
causally), fine-tune a classifier from it, and refuse at config time what it cannot do."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval_helpers import make_eval_project

from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.evaluate.config import EvaluateConfig, MaskedLMSettings
from lmpipe.evaluate.masked import masked_scores, pseudo_perplexity, spans
from lmpipe.evaluate.run import run as evaluate
from lmpipe.model.classifier import load_classifier
from lmpipe.model.gpt import GPT, GPTConfig
from lmpipe.registry.export_hf import export_hf
from lmpipe.tokenizer.shards import TokenShardReader
from lmpipe.train.distill import stage as distill
from lmpipe.train.distill.config import DistillConfig
from lmpipe.train.finetune.config import FinetuneConfig
from lmpipe.train.finetune.stage import run_task
from lmpipe.train.pretrain.config import PretrainConfig
from lmpipe.train.pretrain.stage import train

FAST = {"max_steps": 30, "micro_batch_size": 16, "warmup_steps": 2, "log_every": 10, "checkpoint_every": 0,
        "progress": False, "accelerator": "cpu"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, one_thread_module: None) -> tuple[Paths, str, dict[str, Any]]:
    """The evaluate tests' tiny project with models/pretrain replaced by a masked LM pretrained for
    a few steps, and a classifier fine-tuned from it (models/finetune/cls); returns the
    fine-tune summary too."""
    paths, fingerprint = make_eval_project(tmp_path_factory.mktemp("mlm"))
    train(PretrainConfig.model_validate({
        **FAST, "objective": "mlm", "lr": 1e-2, "eval_every": 0, "eval_batches": 2, "sample_tokens": 0,
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "block_size": 32}}), paths)
    tuned = run_task(FinetuneConfig.model_validate({"tasks": {"cls": {
        **FAST, "type": "classification", "pooling": "mean", "lr": 3e-3, "max_steps": 80, "eval_every": 20,
        "patience": 0, "eval_batch_size": 32, "class_weights": "balanced"}}}), "cls", paths)
    return paths, fingerprint, tuned


def test_classification_fine_tunes_from_the_masked_lm_encoder(project: tuple[Paths, str, dict[str, Any]]) -> None:
    paths, _, tuned = project
    assert tuned["cls/steps"] == 80
    # 0.85 when written (majority class 0.575): a few MLM steps leave the encoder's states nearly
    # alike, so it takes more steps than a random-init base needs
    assert tuned["cls/dev_accuracy"] >= tuned["cls/dev_majority_accuracy"] + 0.15
    model, labels, config = load_classifier(paths.models / "finetune" / "cls")
    assert model.backbone.config.bidirectional and config["objective"] == "mlm" and labels == ["negative", "positive"]


def test_evaluate_scores_a_masked_lm_on_masked_tokens_never_causally(
        project: tuple[Paths, str, dict[str, Any]]) -> None:
    paths, fingerprint, _ = project
    summary = evaluate(EvaluateConfig.model_validate({
        "models": {"teacher": "models/pretrain"}, "splits": ["test"], "instruction": {},
        "classification": {"cls": {"models": {"finetuned": "models/finetune/cls"}}},
        "baselines": {"shots": [0]}, "speed": {"repeats": 1, "warmup": 0, "new_tokens": 4, "batch_sizes": [1]},
        "sample_tokens": 4, "prompts": ["The movie was"], "masked_lm": {"pseudo_perplexity_windows": 2}}), paths)
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    test = metrics["teacher"]["test"]
    assert set(test) == {"masked_loss", "masked_accuracy", "mask_rate", "pseudo_perplexity", "pseudo_loss"}
    assert test["mask_rate"] == 0.15 and 0 <= test["masked_accuracy"] <= 1
    assert test["pseudo_perplexity"] == pytest.approx(math.exp(test["pseudo_loss"]))
    assert not [k for k in metrics["teacher"] if k.startswith(("tokens_per_s", "latency"))]
    assert summary["teacher.test.masked_accuracy"] == test["masked_accuracy"]  # the CLI logs these to MLflow
    assert 0 <= metrics["cls"]["finetuned"]["accuracy"] <= 1

    details = json.loads((paths.reports / "evaluation.json").read_text())
    teacher = details["models"]["teacher"]
    assert teacher["objective"] == "mlm" and teacher["lm"] == {} and "samples" not in teacher
    assert set(teacher["skipped"]) == {"lm", "speed", "samples"} and "speed_settings" not in details
    tokens = np.asarray(TokenShardReader(paths.tokens, fingerprint).tokens("test"))
    scored = teacher["masked"]["test"]["masked_tokens"] / int((tokens != 2).sum())  # EOS (2) is never masked
    assert abs(scored - 0.15) < 0.06  # the pretraining rate, recorded in the model's config.json
    assert set(details["baselines"]["cls"]["rows"]) == {"majority", "bag_of_words", "finetuned"}

    page = (paths.reports / "report.html").read_text()
    assert "Masked language modelling" in page and "pseudo-perplexity" in page
    assert "Causal loss and bits per byte of <b>teacher</b> skipped: a masked LM sees the tokens after" in page
    assert "Generation speed of <b>teacher</b> skipped" in page and "Sample generations of <b>teacher</b> skipped" in page
    assert "Prompted baselines (zero- and few-shot) skipped: the base model models/pretrain is a masked LM" in page
    assert "No comparison: the teacher &#x27;teacher&#x27; is a masked LM" in page


def test_pairings_a_masked_lm_cannot_do_fail_at_config_time(project: tuple[Paths, str, dict[str, Any]],
                                                            tmp_path: Path) -> None:
    paths, _, _ = project
    missing = {"type": "files", "paths": ["nowhere.jsonl"]}  # read first, were the base not refused before
    sft = FinetuneConfig.model_validate({"tasks": {"sft": {**FAST, "type": "sft", "train_data": missing}}})
    with pytest.raises(ConfigError) as err:
        run_task(sft, "sft", paths)
    assert str(err.value) == (
        f"finetune.tasks.sft.init: {paths.models / 'pretrain'} was pretrained as a masked LM (pretrain.objective: "
        "mlm), whose every token sees the tokens after it, but instruction tuning (type: sft) trains and generates "
        "answers left to right: point it at a causal model (pretrain.objective: clm)")
    with pytest.raises(ConfigError, match=r"^distill.teacher: .*masked LM.*distill trains a causal student"):
        distill.run(DistillConfig.model_validate({"max_steps": 2}), Paths(paths.root))
    with pytest.raises(ConfigError, match=r"^export-hf --model: .*masked LM.*causal-LM export predicts each token"):
        export_hf(paths.models / "pretrain", tmp_path / "hf", tmp_path / "no-tokenizer")
    first = FinetuneConfig.model_validate({"tasks": {"c": {
        **FAST, "type": "classification", "pooling": "first", "init": "models/distill", "train_data": missing}}})
    with pytest.raises(ConfigError, match=r"finetune.tasks.c.pooling: 'first' .* causal model"):
        run_task(first, "c", paths)


def test_pseudo_perplexity_masks_each_position_in_turn() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16, bidirectional=True)).eval()
    tokens = np.array([0, 5, 6, 7, 0, 8, 9, 3, 4, 11, 0, 12, 13], dtype=np.uint16)
    masking = {"mask_id": 19, "vocab_size": 20, "probability": 0.5, "special_ids": (0,)}
    windows = spans(len(tokens), 8)
    nats, count = 0.0, 0
    with torch.no_grad():
        for start, end in windows:
            window = torch.from_numpy(tokens[start:end].astype(np.int64))
            for t in range(len(window)):
                if window[t] == 0:
                    continue
                masked = window.clone()
                masked[t] = 19
                logits, _ = model(masked[None])
                nats -= float(F.log_softmax(logits[0, t], -1)[window[t]])
                count += 1
    got = pseudo_perplexity(model, tokens, windows, masking, 10, 3, torch.device("cpu"), "32-true")
    assert got["pseudo_tokens"] == count == 10 and got["pseudo_windows"] == 2
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    settings = MaskedLMSettings(pseudo_perplexity_windows=0)
    once, again = (masked_scores(model, tokens, masking, settings, batch_size=1) for _ in range(2))
    assert once == again and "pseudo_perplexity" not in once  # seeded masks: the same positions every run
    assert masked_scores(model, tokens, masking, MaskedLMSettings(seed=7, pseudo_perplexity_windows=0)) != once

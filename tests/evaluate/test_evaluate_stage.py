"""The evaluate stage on a tiny project: metrics, plots, comparison, report, tokenizer checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_eval_helpers import make_eval_project, save_gpt

from lmpipe.config import Paths
from lmpipe.errors import DataError, FingerprintMismatch
from lmpipe.evaluate.config import EvaluateConfig
from lmpipe.evaluate.run import run

FAST = {"speed": {"repeats": 1, "warmup": 0, "new_tokens": 4, "batch_sizes": [1, 2]}, "sample_tokens": 4,
        "prompts": ["The movie was"], "classification": {}, "instruction": {}, "baselines": {"enabled": False}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Paths, str]:
    return make_eval_project(tmp_path_factory.mktemp("evaluate"))


def config(**overrides: Any) -> EvaluateConfig:
    return EvaluateConfig.model_validate({**FAST, **overrides})


def test_evaluate_writes_metrics_plots_comparison_and_report(project: tuple[Paths, str]) -> None:
    paths, _ = project
    (paths.root / "extra.txt").write_text("the movie was good.\n\nthe plot was dull and boring.\n", encoding="utf-8")
    paths.plots.mkdir(exist_ok=True)
    for name in ("pretrain_loss.csv", "distill_loss.csv"):  # as pretrain and distill write them
        (paths.plots / name).write_text("step,train_loss,val_loss\n10,5.0,\n20,4.0,4.5\n", encoding="utf-8")
    (paths.plots / "finetune" / "cls").mkdir(parents=True, exist_ok=True)  # as finetune writes it
    (paths.plots / "finetune" / "cls" / "dev.csv").write_text("step,loss,accuracy\n0,0.7,0.5\n50,0.2,0.9\n")
    summary = run(config(
        eval_files=[{"name": "extra", "path": "extra.txt"}],
        classification={"cls": {"models": {"finetuned": "models/finetune/cls"}}},
        instruction={"sft": {"model": "models/finetune/sft", "max_examples": 3, "max_new_tokens": 4}},
    ), paths)
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    assert set(metrics) == {"teacher", "student", "baseline", "comparison", "cls", "sft"}
    teacher, student = metrics["teacher"], metrics["student"]
    for data in ("val", "test", "extra"):
        assert teacher[data]["bpb"] > 0 and teacher[data]["perplexity"] == pytest.approx(
            2.718281828 ** teacher[data]["loss"], rel=1e-6)
    assert teacher["tokens_per_s_b1"] > 0 and teacher["latency_ms_per_token_b2"] > 0
    row = metrics["comparison"]["student"]
    assert row["parameters_pct"] == pytest.approx(100 * student["parameters"] / teacher["parameters"])
    assert row["quality_retained_pct"] == pytest.approx(100 * teacher["val"]["bpb"] / student["val"]["bpb"])
    assert row["speedup_b1"] == pytest.approx(student["tokens_per_s_b1"] / teacher["tokens_per_s_b1"])
    assert set(metrics["comparison"]) == {"student", "baseline"}
    assert 0 <= metrics["cls"]["finetuned"]["accuracy"] <= 1 and set(metrics["sft"]) == {"bleu", "rouge_l", "exact_match"}
    assert summary["student.parameters_pct"] == row["parameters_pct"]

    bpb_rows = (paths.plots / "evaluate_bpb.csv").read_text().splitlines()
    assert bpb_rows[0] == "model,val,test,extra" and bpb_rows[1].startswith("teacher,") and len(bpb_rows) == 4
    assert float(bpb_rows[1].split(",")[1]) == pytest.approx(teacher["val"]["bpb"])
    assert (paths.plots / "evaluate_speed.csv").read_text().splitlines()[0] == "model,tokens_per_s_b1,tokens_per_s_b2"
    assert len((paths.plots / "evaluate_comparison.csv").read_text().splitlines()) == 4
    details = json.loads((paths.reports / "evaluation.json").read_text())
    assert details["models"]["teacher"]["samples"][0]["prompt"] == "The movie was"
    assert details["instruction"]["sft"]["samples"][0]["reference"]

    page = (paths.reports / "report.html").read_text()
    assert "Teacher vs student vs baseline" in page and "quality retained %" in page
    figures = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page)
    assert figures == ["training loss curves", "finetune dev curves", "teacher vs student comparison",
                       "bits per byte per model"]
    assert "2. Tokenizer" in page and "not available: run `lmpipe clean`" in page  # no clean report in this project
    assert str(paths.reports / "report.html") in summary["artifacts"]


def test_model_of_another_tokenizer_is_refused_before_any_scoring(project: tuple[Paths, str]) -> None:
    paths, _ = project
    save_gpt(paths.models / "foreign", "0123456789abcdef-other-tokenizer")
    cfg = config(models={"teacher": "models/pretrain", "foreign": "models/foreign"})
    with pytest.raises(FingerprintMismatch) as err:
        run(cfg, paths)
    message = str(err.value)
    assert "models/foreign/config.json" in message and "tokenizer 0123456789ab" in message
    assert "\n" not in message  # the CLI prints it as one line


def test_token_shards_of_another_tokenizer_are_refused(project: tuple[Paths, str], tmp_path: Path) -> None:
    paths, _ = project
    other = Paths(tmp_path)
    other.tokens.mkdir(parents=True)
    meta = json.loads((paths.tokens / "meta.json").read_text())
    (other.tokens / "meta.json").write_text(json.dumps({**meta, "tokenizer_fingerprint": "not-this-tokenizer"}))
    (other.root / "artifacts").symlink_to(paths.root / "artifacts")
    (other.root / "models").symlink_to(paths.root / "models")
    with pytest.raises(FingerprintMismatch, match="token shards were made with tokenizer not-this-tokenizer"):
        run(config(models={"teacher": "models/pretrain"}, speed={"enabled": False}), other)


def test_missing_models_are_an_error_or_skipped(project: tuple[Paths, str]) -> None:
    paths, _ = project
    models = {"teacher": "models/pretrain", "student": "models/not-trained"}
    with pytest.raises(DataError, match="evaluate.models.student: no model here"):
        run(config(models=models), paths)
    with pytest.raises(DataError, match="evaluate.instruction.sft.model: no model here"):
        run(config(models={}, instruction={"sft": {"model": "models/finetune/none"}}), paths)
    summary = run(config(models=models, missing="skip", splits=["val"], speed={"enabled": False}, sample_tokens=0,
                         classification={"cls": {"models": {"gone": "models/finetune/none"}}}), paths)
    assert summary["models"] == 1
    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    assert set(metrics) == {"teacher", "comparison"} and metrics["comparison"] == {}

"""The finetune stage as a whole: several tasks in one run, exact resume after a crash, resume of
an early-stopped run, and the errors a user sees for impossible settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback
from pydantic import ValidationError
from safetensors.torch import load_file
from test_finetune_helpers import config, make_project

from lmpipe.config import Paths
from lmpipe.errors import ConfigError
from lmpipe.train.finetune.config import FinetuneConfig, SFTTask, SplitData
from lmpipe.train.finetune.stage import run, run_task

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout in the head and the adapters: a resumed run must replay the same masks.
RESUMABLE = {"type": "classification", "method": "lora", "lr": 1e-2, "max_steps": 12, "eval_every": 4,
             "checkpoint_every": 4, "test_data": None, "head_dropout": 0.2, "lora": {"r": 4, "dropout": 0.1}}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return make_project(tmp_path_factory.mktemp("stage"), n_train=120, n_val=30, n_test=6)


class Crash(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def tensors(path: Path) -> dict[str, bytes]:
    return {name: t.numpy().tobytes() for name, t in load_file(path).items()}


def outputs(project: Paths, task: str) -> dict[str, Any]:
    """Everything a run exports, minus timings: weights compared bit for bit."""
    out = project.models / "finetune" / task
    metrics = json.loads((project.metrics / f"finetune_{task}.json").read_text())
    for key in ("tokens_per_s", "resumed_from_step"):
        metrics.pop(key)
    return {"weights": tensors(out / "model.safetensors"), "head": tensors(out / "head.safetensors"),
            "adapter": tensors(out / "adapter" / "adapter_model.safetensors"),
            "eval": json.loads((out / "eval.json").read_text()), "metrics": metrics}


def test_a_crashed_run_resumes_to_the_same_model(project: Paths) -> None:
    run_task(config(whole=RESUMABLE), "whole", project)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_task(config(crashed=RESUMABLE), "crashed", project, callbacks=[Crash(at_step=6)])
    assert not (project.models / "finetune" / "crashed").exists()
    [run_dir] = (project.checkpoints / "finetune" / "crashed").iterdir()
    assert sorted(p.name for p in run_dir.glob("*.ckpt")) == ["step-00000004.ckpt"]
    summary = run_task(config(crashed=RESUMABLE), "crashed", project)
    assert summary["crashed/resumed_from_step"] == 4 and summary["crashed/steps"] == 12
    assert outputs(project, "crashed") == outputs(project, "whole")


def test_an_early_stopped_run_stays_stopped(project: Paths) -> None:
    # min_delta larger than any change: the first trained evaluation is the best, the next one stops
    spec = {**RESUMABLE, "max_steps": 40, "patience": 1, "min_delta": 10.0, "checkpoint_every": 0}
    first = run_task(config(stops=spec), "stops", project)
    assert (first["stops/steps"], first["stops/best_step"], first["stops/stopped_early"]) == (8, 4, 1)
    before = outputs(project, "stops")
    again = run_task(config(stops=spec), "stops", project)
    assert (again["stops/resumed_from_step"], again["stops/steps"]) == (8, 8)
    assert outputs(project, "stops") == before


def test_run_does_every_task_with_prefixed_keys(project: Paths) -> None:
    cfg = config(one={"type": "sft", "max_steps": 2, "eval_every": 0},
                 two={"type": "classification", "max_steps": 2, "eval_every": 0, "test_data": None})
    summary = run(cfg, project)
    assert summary["one/steps"] == 2 and summary["two/steps"] == 2 and "one/dev_loss" in summary
    assert summary["artifacts"] == []
    assert {p.name for p in (project.models / "finetune").iterdir()} >= {"one", "two"}


def test_impossible_settings_are_config_errors(project: Paths) -> None:
    with pytest.raises(ConfigError, match=r"no task named 'nope' \(tasks: sft, cls, ner\)"):
        run_task(FinetuneConfig(), "nope", project)
    with pytest.raises(ConfigError, match=r"finetune.tasks.long.max_length: 100 exceeds the model's block_size 64"):
        run_task(config(long={"type": "sft", "max_length": 100}), "long", project)


def test_config_defaults_and_validation() -> None:
    defaults = FinetuneConfig()
    sft_task = defaults.tasks["sft"]
    assert isinstance(sft_task, SFTTask) and sft_task.method == "lora"
    assert sft_task.train_data == SplitData(type="split", split="train", kind="instruction")
    assert sft_task.sample_data == SplitData(type="split", split="test", kind="instruction")
    assert defaults.tasks["cls"].dev_data == SplitData(type="split", split="val", kind="review")
    assert defaults.tasks["cls"].test_data == SplitData(type="split", split="test", kind="review")
    assert defaults.tasks["ner"].train_data == SplitData(type="split", split="train", kind="entity")
    assert defaults.tasks["ner"].test_data == SplitData(type="split", split="test", kind="entity")
    # a task of one's own reads no split it was not pointed at
    assert FinetuneConfig.model_validate({"tasks": {"x": {"type": "classification"}}}).tasks["x"].test_data is None
    bad = [
        ({"x": {"type": "classification", "dev_data": {"type": "files", "paths": ["a"], "columns": {"txt": "a"}}}},
         "dev_data.columns: unknown field(s) txt (fields: text, label)"),
        ({"x": {"type": "classification", "labels": ["a", "b"], "class_weights": [1.0]}}, "1 weights for 2 labels"),
        ({"x y": {"type": "sft"}}, "must be letters, digits"),
        ({"x": {"type": "sft", "lr": "1e-3"}}, "Input should be a valid number"),
        ({"x": {"type": "sft", "epochs": 3}}, "Extra inputs are not permitted"),
        ({"x": {"type": "token_classification", "labels": ["O", "PER"]}}, "'PER' is not an IOB2 tag"),
        ({"x": {"type": "token_classification", "train_data": {"type": "files", "paths": ["a"], "columns": {"text": "a"}}}},
         "train_data.columns: unknown field(s) text (fields: tokens, tags)"),
    ]
    for tasks, message in bad:
        with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
            FinetuneConfig.model_validate({"tasks": tasks})

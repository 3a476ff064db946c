"""lmpipe lm-eval: lm-evaluation-harness offline on the HF export of a tiny model, with tasks
written from the project's own data; results in metrics, the details file and MLflow."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import yaml
from test_eval_helpers import make_eval_project

from lmpipe.cli import main
from lmpipe.config import Paths
from lmpipe.evaluate import harness
from lmpipe.evaluate.config import EvaluateConfig


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Paths:
    return make_eval_project(tmp_path_factory.mktemp("lm-eval"))[0]


def test_lm_eval_command_scores_local_tasks_and_logs_them(project: Paths) -> None:
    from mlflow import MlflowClient

    experiment = f"lm-eval-{uuid.uuid4().hex[:8]}"
    (project.root / "params.yaml").write_text(yaml.safe_dump({
        "tracking": {"experiment": experiment},
        "evaluate": {"classification": {"cls": {"models": {"finetuned": "models/finetune/cls"}}},
                     "lm_eval": {"limit": 12, "batch_size": 8}}}))
    assert main(["lm-eval", "--root", str(project.root)]) == 0
    metrics = json.loads((project.metrics / "lm_eval.json").read_text())
    assert set(metrics) == {"lmpipe_cls", "lmpipe_perplexity_test"}
    assert 0 <= metrics["lmpipe_cls"]["acc"] <= 1 and metrics["lmpipe_cls"]["examples"] == 12
    ppl = metrics["lmpipe_perplexity_test"]
    assert ppl["bits_per_byte"] > 0 and ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"], rel=1e-6)
    details = json.loads((project.reports / "lm_eval.json").read_text())
    assert details["architecture"] == "GPTNeoXForCausalLM" and details["lm_eval_version"].startswith("0.4")
    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    assert run.data.metrics["lm_eval.lmpipe_cls.acc"] == metrics["lmpipe_cls"]["acc"]
    assert not (project.root / ".lmpipe-tmp").exists() or not any((project.root / ".lmpipe-tmp").iterdir())


def test_task_files_are_local_and_a_run_without_tasks_is_refused(project: Paths, tmp_path: Path) -> None:
    cfg = EvaluateConfig.model_validate({"classification": {"cls": {"models": {"m": "models/finetune/cls"},
                                                                    "label_words": {"positive": "good"}}},
                                         "lm_eval": {"limit": 3, "perplexity_split": None}})
    assert harness.write_tasks(cfg, project, tmp_path) == ["lmpipe_cls"]
    task = yaml.safe_load((tmp_path / "lmpipe_cls.yaml").read_text())
    assert task["dataset_path"] == "json" and Path(task["dataset_kwargs"]["data_files"]["test"]).is_file()
    rows = [json.loads(line) for line in (tmp_path / "cls.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["choices"] == ["negative", "good"] and rows[0]["query"].endswith("\nSentiment:")
    empty = cfg.model_copy(update={"lm_eval": cfg.lm_eval.model_copy(update={"classification": []})})
    with pytest.raises(harness.DataError, match="evaluate.lm_eval: no task"):
        harness.write_tasks(empty, project, tmp_path)
    with pytest.raises(ValueError, match="lm_eval.classification: 'nope' is not a task"):
        EvaluateConfig.model_validate({"lm_eval": {"classification": ["nope"]}})


def test_offline_also_switches_libraries_imported_before(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    harness.offline()
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True
